"""Train/eval contamination: held-out examples that also appear in the training data, found by normalised hash.

Three levels, each counted and shown with examples:
- exact: the whole example (every turn) is in the training data, case and whitespace folded
  (tuneforge.data.pipeline.example_hash, the hash dedup and the split use);
- prompt: the same question (all turns before the last answer) is in the training data, with any answer:
  the model has seen the question, so its score on it says little about generalisation;
- answer: the same reference answer appears as a training answer (often fine for label or format tasks where
  answers repeat, so it is reported, not flagged).
Prompt and answer hashes fold case, whitespace and punctuation.
"""

from __future__ import annotations

import hashlib
import re

from tuneforge.data.formats import message_text
from tuneforge.data.pipeline import example_hash

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_text(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split(example: dict) -> tuple[str, str]:
    """(prompt text, answer text) of an example: the turns before the last assistant turn, and that turn."""
    if "messages" not in example:
        return example.get("text", ""), ""
    messages = example["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last] if m["role"] != "system")
    answer = message_text(messages[last]) if last < len(messages) else ""
    return prompt, answer


def example_hashes(example: dict) -> dict[str, str]:
    """{"exact", "prompt", "answer"} hashes of one canonical example."""
    prompt, answer = _split(example)
    return {"exact": example_hash(example), "prompt": _digest(normalize_text(prompt)),
            "answer": _digest(normalize_text(answer)) if answer.strip() else ""}


def _preview(example: dict, limit: int = 160) -> str:
    prompt, answer = _split(example)
    text = prompt if prompt else answer
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def contamination_report(train_examples: list[dict], eval_examples: list[dict], *, show: int = 5) -> dict:
    """-> {"train": n, "eval": n, "exact"|"prompt"|"answer": {"count", "percent" (of eval), "examples": [...]},
          "contaminated": bool (any exact or prompt overlap), "eval_hashes": [exact hash per eval example]}

    Each shown example is {"eval_index", "where" (file:line when known), "text": a preview}.
    """
    train_sets = {"exact": set(), "prompt": set(), "answer": set()}
    for example in train_examples:
        for kind, value in example_hashes(example).items():
            if value:
                train_sets[kind].add(value)
    found = {kind: [] for kind in train_sets}
    eval_hashes = []
    for index, example in enumerate(eval_examples):
        hashes = example_hashes(example)
        eval_hashes.append(hashes["exact"])
        for kind, value in hashes.items():
            if value and value in train_sets[kind]:
                found[kind].append(index)
    n = len(eval_examples)
    report = {"train": len(train_examples), "eval": n}
    for kind, indices in found.items():
        report[kind] = {
            "count": len(indices),
            "percent": 100.0 * len(indices) / n if n else 0.0,
            "examples": [{"eval_index": i, "where": eval_examples[i].get("where", ""), "text": _preview(eval_examples[i])}
                         for i in indices[:show]],
        }
    report["contaminated"] = bool(found["exact"] or found["prompt"])
    report["eval_hashes"] = eval_hashes
    return report


def describe(report: dict) -> str:
    """One line for the terminal."""
    if not report["contaminated"]:
        return f"contamination: none of {report['eval']} eval examples is in the training data"
    return (f"contamination: {report['exact']['count']} of {report['eval']} eval examples are exact copies of "
            f"training examples and {report['prompt']['count']} share a prompt with one; their scores are not "
            f"held-out scores")
