"""Uncertainty for every number a user compares: 95% intervals on deltas between two systems scored on the same
examples (base vs tuned, before vs after, method vs method), and the rule that raises a flag only when the data
can tell.

- `paired_delta(before, after)`: per-example scores of two systems on the same examples -> the mean difference
  (after - before) with a 95% percentile interval from a paired bootstrap over examples (resampling examples keeps
  each example's two scores together: the interval reflects which examples changed, not the spread of items).
  For 0/1 outcomes the exact McNemar test (two-sided binomial on the discordant pairs) gives the p-value.
- `mean_interval(values)`: one system's mean with its bootstrap interval; `wilson(k, n)`: a proportion's interval.
- `is_real_drop(delta, threshold)`: a flag (forgetting, regression) needs the whole interval below zero AND a drop
  larger than the threshold; `is_real_gain` the mirror (e.g. "tuned beats few-shot").

Scores are in the units given (e.g. 0/100 per item for percentages); the bootstrap is seeded, so a report is
reproducible.
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95
RESAMPLES = 2000


def _percentile_interval(samples, confidence: float) -> list[float]:
    import numpy as np

    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_delta(before: list[float], after: list[float], *, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"delta", "ci95": [low, high], "n", "method", ("p_value" for 0/1 or 0/100 outcomes)} of mean(after) - mean(before)
    over the same examples."""
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired scores need the same examples: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        return {"delta": None, "ci95": None, "n": 0, "method": "none"}
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    delta = float(diff.mean())
    if n == 1 or np.all(diff == diff[0]):
        result = {"delta": delta, "ci95": [delta, delta], "n": n, "method": "paired bootstrap"}
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(resamples, n))
        result = {"delta": delta, "ci95": _percentile_interval(diff[idx].mean(axis=1), confidence), "n": n,
                  "method": "paired bootstrap"}
    binary = _binary_pairs(before, after)
    if binary is not None:
        result["p_value"] = mcnemar_exact(*binary)
        result["method"] += " + exact McNemar"
    return result


def paired_ratio_delta(before: list[list[float]], after: list[list[float]], *, confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Per-example [summed value, weight] pairs of two systems on the same examples (e.g. [loss sum, tokens]) ->
    {"delta", "ci95", "n", "method"} of the weighted means' difference (after - before), bootstrapped over examples."""
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired scores need the same examples: {len(before)} before, {len(after)} after")
    if not before:
        return {"delta": None, "ci95": None, "n": 0, "method": "none"}
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b[:, 1].sum() == 0 or a[:, 1].sum() == 0:
        return {"delta": None, "ci95": None, "n": len(before), "method": "none"}
    delta = float(a[:, 0].sum() / a[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum())
    idx = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = a[idx, 0].sum(1) / a[idx, 1].sum(1) - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    samples = samples[np.isfinite(samples)]
    return {"delta": delta, "ci95": _percentile_interval(samples, confidence), "n": len(before),
            "method": "paired bootstrap (weighted means)"}


def paired_statistic_delta(before: list, after: list, statistic, *, confidence: float = CONFIDENCE,
                           resamples: int = 1000, seed: int = 0) -> dict:
    """A corpus-level score (e.g. macro-F1: not a mean of per-example scores) of two systems on the same examples:
    `statistic(items) -> float` over each system's per-example items; the bootstrap resamples example indices and
    recomputes both systems' statistic on the same resample -> {"delta", "ci95", "n", "method"}."""
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired scores need the same examples: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        return {"delta": None, "ci95": None, "n": 0, "method": "none"}
    delta = float(statistic(after) - statistic(before))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    samples = [statistic([after[i] for i in row]) - statistic([before[i] for i in row]) for row in idx]
    return {"delta": delta, "ci95": _percentile_interval(samples, confidence), "n": n,
            "method": "paired bootstrap (statistic recomputed per resample)"}


def _binary_pairs(before, after) -> tuple[int, int] | None:
    """(improved, worsened) counts when every score is one of two values (0/1 or 0/100), else None."""
    values = set(before) | set(after)
    if not values or len(values) > 2 or not values <= {0, 1, 0.0, 1.0, 100, 100.0}:
        return None
    top = max(values)
    improved = sum(1 for b, a in zip(before, after) if a == top and b != top)
    worsened = sum(1 for b, a in zip(before, after) if b == top and a != top)
    return improved, worsened


def mcnemar_exact(improved: int, worsened: int) -> float:
    """Two-sided exact McNemar p-value: under "no change", each discordant pair goes either way with p = 1/2."""
    n = improved + worsened
    if n == 0:
        return 1.0
    k = min(improved, worsened)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def mean_interval(values: list[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                  seed: int = 0) -> dict:
    """{"mean", "ci95", "n"} of one system's per-example scores (bootstrap over examples)."""
    import numpy as np

    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if n == 1 or np.all(data == data[0]):
        return {"mean": mean, "ci95": [mean, mean], "n": n}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return {"mean": mean, "ci95": _percentile_interval(data[idx].mean(axis=1), confidence), "n": n}


def wilson(successes: int, n: int, *, confidence: float = CONFIDENCE) -> list[float] | None:
    """Wilson score interval of a proportion (as fractions 0..1); None for n = 0."""
    if n == 0:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def is_real_drop(delta: dict, threshold: float) -> bool:
    """A drop the data supports: the whole interval below zero and the drop larger than `threshold`."""
    ci = delta.get("ci95")
    return bool(ci) and delta["delta"] is not None and ci[1] < 0 and -delta["delta"] > threshold


def is_real_gain(delta: dict, threshold: float = 0.0) -> bool:
    """A gain the data supports: the whole interval above zero and the gain larger than `threshold`."""
    ci = delta.get("ci95")
    return bool(ci) and delta["delta"] is not None and ci[0] > 0 and delta["delta"] > threshold


def format_delta(delta: dict, unit: str = "") -> str:
    """'+12.5 [+3.1, +21.9]' — the delta and its interval, for tables."""
    if not delta or delta.get("delta") is None:
        return "n/a"
    low, high = delta["ci95"]
    return f"{delta['delta']:+.1f}{unit} [{low:+.1f}, {high:+.1f}]"
