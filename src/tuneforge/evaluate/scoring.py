"""Score a model on held-out examples: generate an answer for each prompt and apply the recipe's metrics."""

from __future__ import annotations

from tuneforge.data.template import prompt_for_generation
from tuneforge.evaluate.generation import generate_answers
from tuneforge.evaluate.metrics import score


def _question(example: dict) -> str:
    """The last user message before the answer: what a judge (and the report) shows as the question."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")


def evaluate_generation(model, tokenizer, examples: list[dict], *, metrics: list, max_examples: int | None,
                        max_new_tokens: int, batch_size: int, progress=None, label: str = "eval") -> dict:
    """-> {"metrics": {...}, "n": N, "truncated_prompts": K, "samples": [{prompt, question, reference, prediction,
    scores}, ...]}; K prompts were longer than the model's context and kept their last tokens.

    metrics: names, recipe mappings or MetricSpecs (see evaluate/metrics.py). Examples that carry a `tests` field
    (code tasks) give pass_at_k its tests; otherwise the reference answer is used.
    """
    chosen = [e for e in examples if "messages" in e][: max_examples or None]
    pairs = [prompt_for_generation(tokenizer, e) for e in chosen]
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    stats: dict = {}
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, description=f"scoring {label}", stats=stats)
    tests = [e.get("tests") or r for e, r in zip(chosen, references)] if any("tests" in e for e in chosen) else None
    details: dict = {}
    results = score(predictions, references, metrics, tests=tests, details=details)
    samples = []
    for i, (p, r, y) in enumerate(zip(prompts, references, predictions)):
        per_example = {key: values[i] for key, values in details.items() if i < len(values)}
        samples.append({"prompt": p, "question": _question(chosen[i]), "reference": r, "prediction": y,
                        "scores": per_example})
    return {"metrics": results, "n": len(samples), "truncated_prompts": stats["truncated_prompts"], "samples": samples}
