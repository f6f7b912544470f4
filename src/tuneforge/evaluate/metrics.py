"""Generation metrics: each takes (prediction, reference) strings and returns a score in [0, 1].

Add a metric by writing a function and listing it in METRICS; the recipe's `eval.metrics` names them.
"""

from __future__ import annotations

import json


def normalize(text: str) -> str:
    """Whitespace at the ends is not part of an answer."""
    return text.strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    return float(normalize(reference) in prediction)


def json_valid(prediction: str, reference: str) -> float:
    try:
        json.loads(prediction)
    except (json.JSONDecodeError, TypeError):
        return 0.0
    return 1.0


METRICS = {"exact_match": exact_match, "contains": contains, "json_valid": json_valid}


def score(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Mean of each metric over the examples, as a percentage."""
    out = {}
    for name in names:
        function = METRICS[name]
        values = [function(p, r) for p, r in zip(predictions, references)]
        out[name] = 100.0 * sum(values) / max(1, len(values))
    return out
