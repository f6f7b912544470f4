"""The baselines every tuned model is compared against, on the same held-out examples and metrics:

- base zero-shot: the base model answering each held-out prompt as is;
- base few-shot (prompt-only): the base model with k training examples shown first as earlier turns of the
  conversation, i.e. what prompting alone achieves without any training;
- tuned: the trained model, zero-shot.

If the few-shot baseline is as good as the tuned model, the task needed a prompt, not fine-tuning.
"""

from __future__ import annotations

import random

# The keys results are saved under (eval/<key>.json) and shown in the report, in this order.
BASELINES = ("base", "few_shot", "tuned")
BASELINE_TITLES = {"base": "base zero-shot", "few_shot": "base few-shot (prompt only)", "tuned": "tuned"}
# eval/ file names: base keeps the historical baseline.json.
BASELINE_FILES = {"base": "baseline.json", "few_shot": "few_shot.json", "tuned": "tuned.json"}


def _turns(example: dict) -> list[dict]:
    """An example's conversation without its system message, ending at its last assistant turn."""
    messages = [m for m in example["messages"] if m["role"] != "system"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: last + 1]


def few_shot_messages(train_examples: list[dict], k: int, seed: int = 0, *, max_chars: int | None = None) -> list[dict]:
    """k training examples as alternating user/assistant turns, ready to prepend to a conversation.

    Examples are canonical dicts ({"messages": [...]}); plain-text ones and ones that are not user/assistant
    alternations (tool turns, tool calls) are skipped. The choice is a seeded random sample, so it is repeatable.
    max_chars: stop adding examples once their text would exceed this many characters (long examples can push
    the real question out of a small context window).
    """
    if k <= 0:
        return []
    usable = []
    for example in train_examples:
        if "messages" not in example:
            continue
        turns = _turns(example)
        roles = [m["role"] for m in turns]
        with_tools = example.get("tools") or any(m.get("tool_calls") for m in turns)  # its tools are its own
        if turns and roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0 and not with_tools:
            usable.append(turns)
    chosen = random.Random(seed).sample(usable, min(k, len(usable)))
    shots: list[dict] = []
    size = 0
    for turns in chosen:
        length = sum(len(m["content"]) for m in turns)
        if max_chars is not None and shots and size + length > max_chars:
            break
        shots.extend({"role": m["role"], "content": m["content"]} for m in turns)
        size += length
    return shots


def with_few_shot(example: dict, shots: list[dict], *, as_text: bool = False) -> dict:
    """A copy of `example` with the shots inserted after its system message (if any) and before its first turn.

    as_text: for a model without a chat template (plain prompt/completion data), the shots are written into the
    prompt text instead, each as prompt + answer, as such a model was trained to continue.
    """
    messages = example["messages"]
    head = [m for m in messages[:1] if m["role"] == "system"]
    if as_text:
        pairs = zip(shots[0::2], shots[1::2])
        prefix = "".join(f"{user['content']}{assistant['content']}\n\n" for user, assistant in pairs)
        first = len(head)
        changed = dict(messages[first], content=prefix + messages[first]["content"])
        return {**example, "messages": messages[:first] + [changed] + messages[first + 1:]}
    return {**example, "messages": head + list(shots) + messages[len(head):]}


def few_shot_examples(eval_examples: list[dict], train_examples: list[dict], k: int = 3, seed: int = 0, *,
                      max_chars: int | None = None, as_text: bool = False) -> list[dict]:
    """The held-out examples as the prompt-only baseline sees them (the same shots for every example).
    Pass as_text=True when the tokenizer has no chat template (see `with_few_shot`)."""
    shots = few_shot_messages(train_examples, k, seed, max_chars=max_chars)
    return [with_few_shot(e, shots, as_text=as_text) if "messages" in e else e for e in eval_examples]


# The comparisons every run reports, each with a 95% interval: (name, system, against).
COMPARISONS = (("tuned_vs_base", "tuned", "base"), ("tuned_vs_few_shot", "tuned", "few_shot"))


def per_example_scores(result: dict | None, metric: str) -> list[float] | None:
    """One metric's per-example scores (0-100, in example order) from an evaluate_generation result, or None where
    the metric has none (corpus-level metrics such as macro-F1, pass@k)."""
    samples = (result or {}).get("samples") or []
    values = [s.get("scores", {}).get(metric) for s in samples]
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return None
    return [100.0 * v for v in values]


def metric_deltas(results: dict[str, dict | None]) -> dict[str, dict[str, dict]]:
    """{metric: {"tuned_vs_base": {"delta", "ci95", "p_value", "n", "method"}, "tuned_vs_few_shot": ...}}: each
    comparison of two systems scored on the same held-out examples, with its paired-bootstrap 95% interval."""
    from tuneforge.evaluate.intervals import paired_delta

    out: dict[str, dict[str, dict]] = {}
    for name in baseline_table(results):
        for key, system, against in COMPARISONS:
            after, before = per_example_scores(results.get(system), name), per_example_scores(results.get(against), name)
            if after is not None and before is not None and len(after) == len(before):
                out.setdefault(name, {})[key] = paired_delta(before, after)
            elif name == "macro_f1":  # corpus-level: bootstrap the statistic itself
                from tuneforge.evaluate.classification import label_pairs, macro_f1_of
                from tuneforge.evaluate.intervals import paired_statistic_delta

                after, before = label_pairs(results.get(system)), label_pairs(results.get(against))
                if after is not None and before is not None and len(after) == len(before):
                    out.setdefault(name, {})[key] = paired_statistic_delta(before, after, macro_f1_of)
    return out


def baseline_table(results: dict[str, dict | None]) -> dict[str, dict[str, float | None]]:
    """{"base": result, "few_shot": result, "tuned": result} (each as evaluate_generation returns, or None)
    -> {metric: {"base": %, "few_shot": %, "tuned": %}} for every metric any of them has."""
    names: list[str] = []
    for result in results.values():
        for name in (result or {}).get("metrics", {}):
            if name not in names:
                names.append(name)
    return {name: {key: ((results.get(key) or {}).get("metrics", {}).get(name)) for key in BASELINES} for name in names}
