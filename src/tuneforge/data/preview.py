"""`tuneforge data preview`: the first examples exactly as they will be trained, loss-carrying tokens marked."""

from __future__ import annotations

from tuneforge.data.template import IGNORE_INDEX, Tokenized


def render_tokens(tokenizer, item: Tokenized):
    """A rich Text: tokens that carry loss in bold green on a dark background, the rest dimmed."""
    from rich.text import Text

    text = Text()
    run_ids: list[int] = []
    run_loss = None

    def flush():
        if run_ids:
            piece = tokenizer.decode(run_ids, skip_special_tokens=False)
            text.append(piece, style="bold green on grey15" if run_loss else "dim")

    for token, label in zip(item.input_ids, item.labels):
        carries = label != IGNORE_INDEX
        if carries != run_loss:
            flush()
            run_ids, run_loss = [], carries
        run_ids.append(token)
    flush()
    return text


def loss_text(tokenizer, item: Tokenized) -> str:
    """Exactly the tokens that carry loss, decoded (what a test compares with the assistant turns)."""
    return tokenizer.decode([t for t, l in zip(item.input_ids, item.labels) if l != IGNORE_INDEX], skip_special_tokens=False)


def preview(console, data, tokenizer, count: int = 3) -> None:
    from rich.panel import Panel

    for item in data.train[:count]:
        title = f"{item.where}  ({len(item.input_ids)} tokens, {item.loss_tokens} carry loss{', TRUNCATED' if item.truncated else ''})"
        console.print(Panel(render_tokens(tokenizer, item), title=title, title_align="left"))
    console.print("[bold green on grey15]highlighted[/] = tokens that carry loss; [dim]dim[/] = masked (label -100)")
    print_data_summary(console, data.stats)


def print_data_summary(console, stats) -> None:
    """One line of what the data pipeline did: format, counts, tokens, duplicates, truncation, drops."""
    split = " (split off the training file by hash)" if stats.eval_split_from_train else ""
    console.print(
        f"[bold]data[/] format {stats.format}: {stats.train_examples} train / {stats.eval_examples} eval examples{split}; "
        f"{stats.train_tokens:,} tokens, {stats.loss_tokens:,} carry loss; {stats.duplicates_removed} duplicates removed; "
        f"{stats.truncated} truncated at max_length {stats.max_length} ({stats.truncated_pct:.1f}%)"
        + (f"; {stats.dropped_no_loss} dropped (no answer token left)" if stats.dropped_no_loss else "")
    )
