"""The data pipeline: read -> canonical examples -> dedup -> split -> template + masks -> counts.

`prepare_data` is the one entry point `train`, `data preview` and `doctor` share, so what is previewed is
exactly what is trained. Dedup and the split (splits.py) and DataStats/PreparedData (prepared.py) are re-exported
here for the callers that import them from this module.
"""

from __future__ import annotations

from tuneforge.data.formats import canonicalize
from tuneforge.data.prepared import DataStats, PreparedData
from tuneforge.data.readers import read_records
from tuneforge.data.splits import dedup, example_hash, hash_split
from tuneforge.data.template import Tokenized, tokenize_example
from tuneforge.errors import DataError

__all__ = ["DataStats", "PreparedData", "dedup", "example_hash", "hash_split", "load_examples", "prepare_data",
           "to_dataset", "tokenize_all"]


def load_examples(path: str, fmt: str, *, split: str = "train", limit: int | None = None, system_prompt: str | None = None,
                  keep_field: str | None = None) -> tuple[list[dict], str]:
    """Records -> canonical examples; `keep_field`: a record field carried along as example["order"] (data.order)."""
    records = read_records(path, split=split, limit=limit)
    examples, detected = canonicalize(records, fmt)
    if keep_field is not None:
        for record, example in zip(records, examples):
            value = record.data.get(keep_field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"data.order sorts by the field {keep_field!r}, and this record's value is {value!r}",
                                where=record.where, fix=f"give every record a number in {keep_field!r}, or set "
                                                        "data.order: shuffle or length")
            example["order"] = value
    if system_prompt:
        for example in examples:
            messages = example.get("messages")
            if messages and messages[0]["role"] != "system":
                example["messages"] = [{"role": "system", "content": system_prompt}] + messages
    return examples, detected


def tokenize_all(tokenizer, examples: list[dict], max_length: int) -> tuple[list[Tokenized], int, int]:
    """Tokenize; drop examples left with no loss-carrying token (after truncation) and count them."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        item = tokenize_example(tokenizer, example, max_length)
        truncated += item.truncated
        if item.loss_tokens == 0:
            dropped += 1
            continue
        kept.append(item)
    return kept, truncated, dropped


def prepare_data(recipe, tokenizer, *, resolve=None) -> PreparedData:
    """Everything `train` needs from the recipe's data section. `resolve` maps recipe paths to real paths."""
    from tuneforge.recipe import resolve_path

    data = recipe.data
    resolve = resolve or (lambda value: resolve_path(recipe, value))
    from tuneforge.methods import method_spec

    kind = method_spec(recipe.method).data  # what the method trains on: conversations, text, pairs or prompts
    if kind == "pairs":
        from tuneforge.data.preference import prepare_preference_data

        return prepare_preference_data(recipe, tokenizer, resolve)
    fmt = "text" if kind == "text" and data.format == "auto" else data.format
    stats = DataStats(max_length=recipe.train.max_length)
    train_parts, eval_parts, formats = [], [], []
    for source in data.sources("train"):  # one file, or several mixed by share (data/mixing.py)
        examples, detected = load_examples(resolve(source.path), fmt, split=data.split, limit=data.max_examples,
                                           system_prompt=data.system_prompt,
                                           keep_field=None if data.order in ("shuffle", "length") else data.order)
        if kind == "conversations" and detected == "text":
            raise DataError(f"method {recipe.method} needs prompts and answers, but {source.path} is plain text",
                            where="data.format", fix="use method: cpt for plain text, or give messages / "
                                                     "prompt+completion data")
        formats.append(detected)
        if data.dedup:
            examples, removed = dedup(examples)
            stats.duplicates_removed += removed
        if not data.eval:
            examples, held_out = hash_split(examples, data.eval_fraction)
            eval_parts.append((source.path, source.weight, held_out))
        train_parts.append((source.path, source.weight, examples))
    if "text" in formats and len(set(formats)) > 1:
        raise DataError(f"the sources mix plain text with conversations ({', '.join(formats)})", where="data.train",
                        fix="mix sources of one kind: all conversations (any chat format) or all plain text")
    stats.format = "+".join(dict.fromkeys(formats))
    if data.eval:
        for source in data.sources("eval"):
            examples, _ = load_examples(resolve(source.path), formats[0] if fmt == "auto" else fmt, split=data.eval_split,
                                        system_prompt=data.system_prompt)
            eval_parts.append((source.path, source.weight, dedup(examples)[0] if data.dedup else examples))
    else:
        stats.eval_split_from_train = True
    train_examples, stats.sources = _combine(train_parts, recipe.train.seed)
    eval_examples, eval_sources = _combine(eval_parts, recipe.train.seed, mixed=isinstance(data.eval, list))
    if stats.sources:
        stats.sources = {"train": stats.sources, "eval": eval_sources}
    train_hashes = {example_hash(e) for e in train_examples}
    stats.overlap_train_eval = sum(example_hash(e) in train_hashes for e in eval_examples)

    if data.order != "shuffle":  # a curriculum: ascending by length or by the field (stable, so ties keep file order)
        key = (lambda e: len(str(e.get("messages") or e.get("text")))) if data.order == "length" else (lambda e: e["order"])
        train_examples = sorted(train_examples, key=key)
    train, stats.truncated, stats.dropped_no_loss = tokenize_all(tokenizer, train_examples, recipe.train.max_length)
    if data.order == "length":  # by tokens, as the model sees them
        train.sort(key=lambda t: len(t.input_ids))
    evaluation, _, _ = tokenize_all(tokenizer, eval_examples, recipe.train.max_length)
    if not train:
        raise DataError(
            "no training example has any token that carries loss (every answer was cut off by max_length, or "
            "the template put no assistant text in the sequence)",
            where="data.train",
            fix="raise train.max_length or check the data with `tuneforge data preview`",
        )
    stats.train_examples, stats.eval_examples = len(train), len(evaluation)
    stats.train_tokens = sum(len(t.input_ids) for t in train)
    stats.loss_tokens = sum(t.loss_tokens for t in train)
    return PreparedData(train, evaluation, train_examples, eval_examples, stats)


def _combine(parts: list, seed: int, *, mixed: bool = True) -> tuple[list[dict], list[dict] | None]:
    """One source: its examples as they are. Several: mixed by share (or, mixed=False, held-out parts joined whole)."""
    if len(parts) == 1:
        return parts[0][2], None
    if not mixed:
        return [dict(e, source=name) for name, _, examples in parts for e in examples], \
            [{"path": name, "used": len(examples)} for name, _, examples in parts]
    from tuneforge.data.mixing import mix

    return mix(parts, seed=seed)


def to_dataset(items: list[Tokenized]):
    """Tokenized examples -> a datasets.Dataset with input_ids and labels (TRL's pre-tokenized form)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [t.input_ids for t in items], "labels": [t.labels for t in items]})
