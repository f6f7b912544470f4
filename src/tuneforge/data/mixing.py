"""Several data sources mixed by share (`data.train: [{path, weight}, ...]`): the seeds' first remedy for forgetting is
to replay 5-20% general data beside the task data (seed 000, seed 001 part 12).

The mix keeps the total size of the sources (the sum of their examples) and gives each source its share of it: a
source with more examples than its share contributes a seeded random sample, one with fewer is repeated (whole
copies, then a seeded sample for the rest). Every source's counts — available, used, repeated — go to
data_stats.json, so what the model saw is on record. Examples keep their source's name in `source`.
"""

from __future__ import annotations

import random


def shares(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def quotas(sizes: list[int], weights: list[float]) -> list[int]:
    """How many examples each source contributes: its share of the total size, rounded so they sum to the total
    (largest remainders get the leftover)."""
    total = sum(sizes)
    exact = [share * total for share in shares(weights)]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def take(examples: list, count: int, rng: random.Random) -> list:
    """`count` examples of `examples`: a sample without repeats when there are enough, else whole copies and a sample."""
    if count <= len(examples):
        return rng.sample(examples, count)
    copies, rest = divmod(count, len(examples))
    return examples * copies + rng.sample(examples, rest)


def mix(parts: list[tuple[str, float, list[dict]]], *, seed: int) -> tuple[list[dict], list[dict]]:
    """parts: (source name, weight, examples) -> (mixed examples in a seeded shuffled order, per-source counts)."""
    rng = random.Random(seed)
    sizes = [len(examples) for _, _, examples in parts]
    wanted = quotas(sizes, [weight for _, weight, _ in parts])
    mixed, counts = [], []
    for (name, weight, examples), share, count in zip(parts, shares([w for _, w, _ in parts]), wanted):
        chosen = take(examples, count, rng) if examples else []
        mixed += [{**example, "source": name} for example in chosen]
        counts.append({"path": name, "weight": weight, "share": round(share, 4), "available": len(examples),
                       "used": len(chosen), "repeated": max(0, len(chosen) - len(examples))})
    rng.shuffle(mixed)
    return mixed, counts
