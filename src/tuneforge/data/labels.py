"""Labelled data for `method: classify`: each record is a text (or a pair of texts) and its label.

Accepted records (the field names are classify.text_field / pair_field / label_field):
  {"text": "a fine film", "label": "positive"}
  {"text": "A man plays.", "text_pair": "Someone plays.", "label": "entailment"}
A number as a label is read as its text (0 -> "0"). The label set is classify.labels (its order is the head's
outputs) or, when absent, every label of the training data, sorted; a label outside classify.labels is a DataError
naming the file:line. Dedup and the held-out split go by the text(s), so one text never sits on both sides (and the
same text with two labels is a conflict, reported).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tuneforge.data.readers import Record, read_records
from tuneforge.data.splits import dedup, hash_split, normal_text
from tuneforge.errors import DataError


@dataclass
class LabelledExample:
    text: str
    pair: str | None
    label: int  # index into LabelData.labels
    where: str
    input_ids: list[int] = field(default_factory=list)
    token_type_ids: list[int] | None = None  # the pair's segments, where the tokenizer makes them (BERT)
    truncated: bool = False


@dataclass
class LabelData:
    train: list[LabelledExample]
    eval: list[LabelledExample]
    labels: list[str]
    stats: object = None
    counts: dict = field(default_factory=dict)  # {label: training examples}
    conflicts: int = 0  # texts given two different labels (the later one kept)


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"`{name}` must be a string (got {type(value).__name__})", where=where,
                        fix=f'give each record {{"{name}": "...", ...}}')
    if not value.strip():
        raise DataError(f"`{name}` is empty", where=where, fix="drop the record or write its text")
    return value


def read_labelled(record: Record, section) -> dict:
    data, where = record.data, record.where
    if section.text_field not in data or section.label_field not in data:
        raise DataError(f"a classification record needs `{section.text_field}` and `{section.label_field}`; this one has "
                        f"{sorted(data)}", where=where,
                        fix=f'give {{"{section.text_field}": "...", "{section.label_field}": "..."}} (or set '
                            f"classify.text_field / classify.label_field to your field names)")
    label = data[section.label_field]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
        raise DataError(f"`{section.label_field}` must be a non-empty string or an integer (got {label!r})", where=where,
                        fix="give each record one label, e.g. \"positive\" or 1")
    pair = data.get(section.pair_field)
    return {"text": _text(data[section.text_field], where, section.text_field),
            "pair": None if pair is None else _text(pair, where, section.pair_field),
            "label": str(label).strip(), "where": where}


def text_key(example: dict) -> str:
    content = [normal_text(example["text"]), normal_text(example["pair"]) if example["pair"] is not None else None]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def _count_conflicts(examples: list[dict]) -> int:
    seen: dict[str, str] = {}
    conflicts = 0
    for example in examples:
        key = text_key(example)
        if key in seen and seen[key] != example["label"]:
            conflicts += 1
        seen[key] = example["label"]
    return conflicts


def prepare_label_data(recipe, tokenizer, resolve) -> LabelData:
    """Read, check, dedup, split and tokenize labelled texts (pairs are encoded as the tokenizer's pair input)."""
    from tuneforge.data.prepared import DataStats

    data, section = recipe.data, recipe.classify
    if data.format != "auto":
        raise DataError(f"method classify reads {{text, label}} records; data.format {data.format!r} does not apply",
                        where="data.format", fix="remove data.format (auto)")

    def load(path, split, limit=None):
        return [read_labelled(r, section) for r in read_records(path, split=split, limit=limit)]

    train = load(resolve(data.train), data.split, data.max_examples)
    stats = DataStats(format="labels", max_length=recipe.train.max_length)
    conflicts = _count_conflicts(train)
    if data.dedup:
        train, stats.duplicates_removed = dedup(train, text_key, keep="last")
    if data.eval:
        held = load(resolve(data.eval), data.eval_split)
    else:
        train, held = hash_split(train, data.eval_fraction, text_key)
        stats.eval_split_from_train = True
    if not train:
        raise DataError("no training examples left after the held-out split", where="data.train", fix="add examples")
    labels = list(section.labels) if section.labels else sorted({e["label"] for e in train})
    known = set(labels)
    for example in train + held:
        if example["label"] not in known:
            where_labels = "classify.labels" if section.labels else "the training data's labels"
            raise DataError(f"label {example['label']!r} is not one of {where_labels} ({', '.join(labels)})",
                            where=example["where"],
                            fix=f"add {example['label']!r} to classify.labels, or correct the record" if section.labels
                            else f"every held-out label must occur in the training data; add training examples of "
                                 f"{example['label']!r} or set classify.labels")
    if len(labels) < 2:
        raise DataError(f"the training data has one label only ({labels[0]!r}); a classifier needs at least two",
                        where="data.train", fix="add examples of the other labels, or list them in classify.labels")
    index = {name: i for i, name in enumerate(labels)}
    train_keys = {text_key(e) for e in train}
    stats.overlap_train_eval = sum(text_key(e) in train_keys for e in held)

    def encode(example: dict) -> LabelledExample:
        encoded = tokenizer(example["text"], example["pair"], truncation=True, max_length=recipe.train.max_length)
        ids, types = list(encoded["input_ids"]), encoded.get("token_type_ids")
        whole = len(tokenizer(example["text"], example["pair"], truncation=False)["input_ids"])
        return LabelledExample(example["text"], example["pair"], index[example["label"]], example["where"], ids,
                               list(types) if types is not None and example["pair"] is not None else None,
                               truncated=whole > len(ids))

    train_items, eval_items = [encode(e) for e in train], [encode(e) for e in held]
    stats.train_examples, stats.eval_examples = len(train_items), len(eval_items)
    stats.train_tokens = sum(len(e.input_ids) for e in train_items)
    stats.loss_tokens = stats.train_tokens  # every token feeds the one label's loss
    stats.truncated = sum(e.truncated for e in train_items)
    counts = {name: sum(e.label == i for e in train_items) for i, name in enumerate(labels)}
    return LabelData(train_items, eval_items, labels, stats, counts, conflicts)


def label_dataset(items: list[LabelledExample]):
    """Rows for the Trainer: input_ids (+ token_type_ids for pairs where the tokenizer makes them) and labels."""
    from datasets import Dataset

    rows = {"input_ids": [e.input_ids for e in items], "labels": [e.label for e in items]}
    if any(e.token_type_ids is not None for e in items):
        rows["token_type_ids"] = [e.token_type_ids or [0] * len(e.input_ids) for e in items]
    return Dataset.from_dict(rows)
