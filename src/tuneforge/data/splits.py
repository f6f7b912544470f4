"""Exact-duplicate removal and the deterministic train/eval split by content hash, written once for SFT examples
(pipeline), preference pairs (preference) and RL prompts (prompts); each passes the hash that says what "the same"
means for its data."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from tuneforge.data.formats import message_text


def normal_text(text: str) -> str:
    """Case folded, every run of whitespace (spaces, tabs, newlines) one space, none at the ends."""
    return " ".join(text.lower().split())


def example_hash(example: dict) -> str:
    """Normalised content hash (whitespace and case folded), used for dedup, splitting and contamination checks."""
    if "text" in example:
        content = normal_text(example["text"])
    else:
        content = [(m["role"], normal_text(message_text(m))) for m in example["messages"]]
    normal = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()


def dedup(examples: list[dict], key: Callable[[dict], str] = example_hash, *,
          keep: str = "first") -> tuple[list[dict], int]:
    """Exact duplicates (same `key`) removed; returns (kept, number removed). Examples stay in the order of their
    first occurrence; keep="last" puts the last duplicate's content in that place instead of the first's."""
    kept: dict[str, dict] = {}
    for example in examples:
        k = key(example)
        if k not in kept or keep == "last":
            kept[k] = example
    return list(kept.values()), len(examples) - len(kept)


def hash_split(examples: list[dict], eval_fraction: float,
               key: Callable[[dict], str] = example_hash) -> tuple[list[dict], list[dict]]:
    """Deterministic split by content hash: the same example always lands on the same side, whatever the order
    of the file or the seed (so re-running never leaks eval examples into training). Examples with the same `key`
    (for pairs and RL prompts: the same prompt) land on the same side."""
    train, held = [], []
    threshold = int(eval_fraction * 10_000)
    bucket = lambda example: int(key(example)[:8], 16) % 10_000  # noqa: E731
    for example in examples:
        (held if bucket(example) < threshold else train).append(example)
    if not held and len(train) > 1:
        # Too few examples for the fraction to catch one: hold out the lowest bucket, again by content, not order.
        lowest = min(range(len(train)), key=lambda i: (bucket(train[i]), key(train[i])))
        held.append(train.pop(lowest))
    return train, held
