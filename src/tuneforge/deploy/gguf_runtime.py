"""A GGUF file as llama.cpp runs it (through llama-cpp-python): its chat template rendered by llama-cpp-python's own
formatter from the file's metadata, its tokenizer, greedy answers, and held-out scores of several quantizations side
by side (`score_gguf_files`: the drop of q8_0 / q4_k_m against f16 and how often their answers agree)."""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge.deploy.gguf_convert import file_size, read_metadata


def token_text(gguf_file: Path, token_id: int | None) -> str:
    """The text of one token of the GGUF's vocabulary (the gguf reader's parts of that array element)."""
    from tuneforge.deploy.gguf_convert import gguf_reader

    if token_id is None:
        return ""
    field = gguf_reader(gguf_file).fields["tokenizer.ggml.tokens"]
    return bytes(field.parts[field.data[token_id]]).decode("utf-8")


def gguf_chat_prompt(gguf_file: Path, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The prompt llama-cpp-python renders for `messages` from the GGUF's tokenizer.chat_template (its
    Jinja2ChatFormatter, given the file's BOS/EOS texts, as Llama.create_chat_completion does)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = read_metadata(gguf_file, ("tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                                     "tokenizer.ggml.eos_token_id"))
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"],
                                    eos_token=token_text(gguf_file, meta.get("tokenizer.ggml.eos_token_id")),
                                    bos_token=token_text(gguf_file, meta.get("tokenizer.ggml.bos_token_id")),
                                    add_generation_prompt=add_generation_prompt)
    return formatter(messages=messages).prompt


def load_gguf(gguf_file: Path, *, n_ctx: int = 2048, threads: int | None = None, vocab_only: bool = False):
    """llama-cpp-python's Llama on the file; the context is `n_ctx` or the model's own, whichever is shorter."""
    from llama_cpp import Llama

    meta = read_metadata(gguf_file, ("general.architecture",))
    trained = read_metadata(gguf_file, (f"{meta.get('general.architecture')}.context_length",))
    n_ctx = min(n_ctx, *trained.values()) if trained else n_ctx
    return Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=threads or min(4, os.cpu_count() or 1),
                 n_batch=512, seed=0, verbose=False, vocab_only=vocab_only)


def prompt_ids(llm, prompt: str) -> list[int]:
    """llama.cpp's tokens for a rendered prompt: special-token texts parsed, BOS added only where the file's
    tokenizer.ggml.add_bos_token says (the way create_chat_completion tokenizes)."""
    return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)


def is_stop(llm, token_id: int) -> bool:
    """Whether llama.cpp ends generation at this token (its end-of-generation set: eos, eot, eom and the like)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token_id))  # noqa: SLF001 -- no public accessor


def greedy_answers(llm, prompts: list[str], *, max_new_tokens: int, progress=None, label: str = "gguf") -> list[str]:
    """Greedy (temperature 0, no repeat penalty) answers for already-rendered prompts; a prompt longer than the
    context keeps its last tokens, as tuneforge's own generation does."""
    limit = max(1, llm.n_ctx() - max_new_tokens)
    answers = []
    task = progress.add_task(f"scoring {label}", total=len(prompts)) if progress is not None else None
    for prompt in prompts:
        ids = prompt_ids(llm, prompt)[-limit:]
        out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    min_p=0.0, repeat_penalty=1.0)
        answers.append(out["choices"][0]["text"])
        if task is not None:
            progress.advance(task)
    return answers


def agreement(predictions: list[str], reference: list[str]) -> float:
    """Percent of answers identical (whitespace at the ends aside) to the reference model's."""
    same = sum(p.strip() == r.strip() for p, r in zip(predictions, reference))
    return 100.0 * same / max(1, len(reference))


def score_gguf_files(files: dict[str, Path], held_out, *, reference: str = "f16", progress=None) -> dict:
    """Score each GGUF (label -> file) on a held-out set (export.HeldOut): the metrics, the drop against the
    `reference` label, agreement with its answers, and the file size. One model in memory at a time."""
    from tuneforge.evaluate.metrics import score

    predictions: dict[str, list[str]] = {}
    rows = []
    for label, path in files.items():
        llm = load_gguf(path)
        predictions[label] = greedy_answers(llm, held_out.prompts, max_new_tokens=held_out.max_new_tokens,
                                            progress=progress, label=label)
        del llm
        rows.append({"label": label, "file": str(path), "size_bytes": path.stat().st_size, "size": file_size(path),
                     "metrics": score(predictions[label], held_out.references, held_out.metrics)})
    base = next((r for r in rows if r["label"] == reference), rows[0])
    for row in rows:
        row["drop"] = {k: round(base["metrics"][k] - v, 2) for k, v in row["metrics"].items()}
        row["agreement"] = round(agreement(predictions[row["label"]], predictions[base["label"]]), 2)
    samples = [{"prompt": p, "reference": r, **{label: predictions[label][i] for label in files}}
               for i, (p, r) in enumerate(zip(held_out.prompts, held_out.references))]
    return {"n": len(held_out.prompts), "reference": base["label"], "source": held_out.source, "rows": rows,
            "samples": samples}


def scores_table(result: dict):
    """A rich table of `score_gguf_files`' result."""
    from rich.markup import escape
    from rich.table import Table

    keys = list(result["rows"][0]["metrics"]) if result["rows"] else []
    table = Table(title=escape(f"GGUF on {result['n']} held-out examples ({result['source']}); drop and agreement "
                               f"vs {result['reference']}"))
    for column in ("quant", "size", *keys, *(f"drop {k}" for k in keys), "agreement"):
        table.add_column(escape(column), justify="left" if column == "quant" else "right")
    for row in result["rows"]:
        table.add_row(row["label"], row["size"], *(f"{row['metrics'][k]:.1f}" for k in keys),
                      *(f"{row['drop'][k]:+.1f}" for k in keys), f"{row['agreement']:.1f}%")
    return table
