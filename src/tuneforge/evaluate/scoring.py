"""Score a model on held-out examples: generate an answer for each prompt and apply the recipe's metrics."""

from __future__ import annotations

from tuneforge.data.template import prompt_for_generation
from tuneforge.evaluate.generation import generate_answers
from tuneforge.evaluate.metrics import score


def evaluate_generation(model, tokenizer, examples: list[dict], *, metrics: list[str], max_examples: int | None,
                        max_new_tokens: int, batch_size: int, progress=None, label: str = "eval") -> dict:
    """-> {"metrics": {...}, "n": N, "samples": [{prompt, reference, prediction}, ...]}"""
    chosen = [e for e in examples if "messages" in e][: max_examples or None]
    pairs = [prompt_for_generation(tokenizer, e) for e in chosen]
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, description=f"scoring {label}")
    samples = [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, references, predictions)]
    return {"metrics": score(predictions, references, metrics), "n": len(samples), "samples": samples}
