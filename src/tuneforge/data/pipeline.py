"""The data pipeline: read -> canonical examples -> dedup -> split -> template + masks -> counts.

`prepare_data` is the one entry point `train`, `data preview` and `doctor` share, so what is previewed is
exactly what is trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tuneforge.data.formats import canonicalize
from tuneforge.data.readers import read_records
from tuneforge.data.template import Tokenized, tokenize_example
from tuneforge.errors import DataError


def _normal(text: str) -> str:
    """Case folded, every run of whitespace (spaces, tabs, newlines) one space, none at the ends."""
    return " ".join(text.lower().split())


def example_hash(example: dict) -> str:
    """Normalised content hash (whitespace and case folded), used for dedup, splitting and contamination checks."""
    if "text" in example:
        content = _normal(example["text"])
    else:
        content = [(m["role"], _normal(m["content"])) for m in example["messages"]]
    normal = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()


def dedup(examples: list[dict]) -> tuple[list[dict], int]:
    seen, kept = set(), []
    for example in examples:
        key = example_hash(example)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept, len(examples) - len(kept)


def hash_split(examples: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by content hash: the same example always lands on the same side, whatever the order
    of the file or the seed (so re-running never leaks eval examples into training)."""
    train, held = [], []
    threshold = int(eval_fraction * 10_000)
    bucket = lambda example: int(example_hash(example)[:8], 16) % 10_000  # noqa: E731
    for example in examples:
        (held if bucket(example) < threshold else train).append(example)
    if not held and len(train) > 1:
        # Too few examples for the fraction to catch one: hold out the lowest bucket, again by content, not order.
        lowest = min(range(len(train)), key=lambda i: (bucket(train[i]), example_hash(train[i])))
        held.append(train.pop(lowest))
    return train, held


@dataclass
class DataStats:
    format: str = ""
    train_examples: int = 0
    eval_examples: int = 0
    duplicates_removed: int = 0
    eval_split_from_train: bool = False
    train_tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    overlap_train_eval: int = 0
    max_length: int = 0

    @property
    def truncated_pct(self) -> float:
        return 100.0 * self.truncated / max(1, self.train_examples + self.dropped_no_loss)


@dataclass
class PreparedData:
    train: list[Tokenized]
    eval: list[Tokenized]
    train_examples: list[dict]
    eval_examples: list[dict]
    stats: DataStats = field(default_factory=DataStats)


def load_examples(path: str, fmt: str, *, split: str = "train", limit: int | None = None, system_prompt: str | None = None) -> tuple[list[dict], str]:
    records = read_records(path, split=split, limit=limit)
    examples, detected = canonicalize(records, fmt)
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
    from tuneforge.data.preference import PREFERENCE_METHODS, prepare_preference_data

    if recipe.method in PREFERENCE_METHODS:
        return prepare_preference_data(recipe, tokenizer, resolve)
    fmt = "text" if recipe.method == "cpt" and data.format == "auto" else data.format
    train_examples, detected = load_examples(resolve(data.train), fmt, split=data.split, limit=data.max_examples,
                                             system_prompt=data.system_prompt)
    stats = DataStats(format=detected, max_length=recipe.train.max_length)
    if recipe.method == "sft" and detected == "text":
        raise DataError("method sft needs prompts and answers, but the data is plain text", where="data.format",
                        fix="use method: cpt for plain text, or give messages / prompt+completion data")
    if data.dedup:
        train_examples, stats.duplicates_removed = dedup(train_examples)
    if data.eval:
        eval_examples, _ = load_examples(resolve(data.eval), detected, split="test", system_prompt=data.system_prompt)
        if data.dedup:
            eval_examples, _ = dedup(eval_examples)
    else:
        train_examples, eval_examples = hash_split(train_examples, data.eval_fraction)
        stats.eval_split_from_train = True
    train_hashes = {example_hash(e) for e in train_examples}
    stats.overlap_train_eval = sum(example_hash(e) in train_hashes for e in eval_examples)

    train, stats.truncated, stats.dropped_no_loss = tokenize_all(tokenizer, train_examples, recipe.train.max_length)
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


def to_dataset(items: list[Tokenized]):
    """Tokenized examples -> a datasets.Dataset with input_ids and labels (TRL's pre-tokenized form)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [t.input_ids for t in items], "labels": [t.labels for t in items]})
