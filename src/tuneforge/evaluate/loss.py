"""Held-out loss and perplexity of a model on tokenized examples (labels -100 carry no loss).

The mean is over loss-carrying tokens of the whole set (not a mean of per-batch means), so it does not depend on
the batch size or on how examples are grouped, and perplexity = exp(mean loss) is the usual per-token figure.
"""

from __future__ import annotations

import math

IGNORE_INDEX = -100


def _fields(example) -> tuple[list[int], list[int]]:
    if isinstance(example, dict):
        ids = example["input_ids"]
        return list(ids), list(example.get("labels", ids))
    return list(example.input_ids), list(example.labels)  # tuneforge.data.template.Tokenized


def mean_loss(model, examples, *, batch_size: int = 8, pad_token_id: int = 0, progress=None,
              description: str = "held-out loss", per_example: bool = False) -> dict:
    """Token-weighted mean cross-entropy of next-token prediction where labels != -100.

    examples: Tokenized items (tuneforge.data.template) or dicts with input_ids and labels (labels default to
    input_ids: every token counts, as for plain text).
    -> {"loss": mean nats per token, "perplexity": exp(loss), "tokens": loss-carrying tokens, "examples": n}
    per_example: also "per_example": [[summed loss, tokens], ...] in the examples' order (for paired intervals).
    """
    import torch

    items = [_fields(e) for e in examples]
    # Longest first: batches of similar length waste less padding (the result does not depend on the order).
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows: dict[int, list[float]] = {}
    task = progress.add_task(description, total=len(items)) if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, labs) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(labs)] = torch.tensor(labs)
                attention[row, : len(ids)] = 1
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            # Prompt tuning / P-tuning return logits for their virtual tokens first: keep the input's positions.
            logits = logits[:, logits.shape[1] - width:] if logits.shape[1] > width else logits
            # Position t predicts token t+1: compare logits[:, :-1] with labels[:, 1:], only where a label counts.
            target = labels[:, 1:].to(logits.device)
            keep = target != IGNORE_INDEX
            # one cross-entropy over the loss-carrying positions only (the rest of the logits are never converted)
            picked = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
            total += picked.sum().item()
            count += int(keep.sum())
            if per_example:  # each row's share of `picked` (boolean indexing keeps row-major order)
                per_row = keep.sum(dim=1).tolist()
                for row, (index, part) in enumerate(zip(order[start : start + batch_size], picked.split(per_row))):
                    rows[index] = [float(part.sum()), per_row[row]]
            if task is not None:
                progress.advance(task, len(batch))
    finally:
        if was_training:
            model.train()
    loss = total / count if count else float("nan")
    result = {"loss": loss, "perplexity": math.exp(loss) if count and loss < 700 else float("inf") if count else float("nan"),
              "tokens": count, "examples": len(items)}
    if per_example:
        result["per_example"] = [rows[i] for i in range(len(items))]
    return result
