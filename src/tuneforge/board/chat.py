"""Base and tuned model side by side on one prompt, through the run's chat template (the tokenizer saved with its
weights), greedy, with the prompt and generation code `tuneforge generate` uses (evaluate/generation.py). A LoRA run
answers as the base with its adapter switched off, so one model is in memory; a full fine-tune loads the base beside
it."""

from __future__ import annotations

import threading
from pathlib import Path

from tuneforge.board.state import BoardError, BoardState

MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 20_000

_cache: dict = {}  # run path + its weights' mtime -> (model, tokenizer, base model or None)
_cache_lock = threading.Lock()


def _models(run_path: Path):
    """(tuned model, tokenizer, base model or None when the tuned one is a LoRA model), kept for the next prompt."""
    from tuneforge.models import load_target
    from tuneforge.run import RunDir

    weights = RunDir(run_path).weights_dir
    key = (str(run_path), weights.stat().st_mtime_ns if weights.exists() else 0)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        _cache.clear()  # one run's models in memory at a time
    model, tokenizer = load_target(str(run_path))  # refuses unfinished runs and trust_remote_code runs
    base = None
    if not hasattr(model, "disable_adapter"):
        from tuneforge.recipe import load_recipe

        recipe = load_recipe(run_path / "recipe.yaml")
        base, _ = load_target(recipe.model.name)
    with _cache_lock:
        _cache[key] = (model, tokenizer, base)
    return _cache[key]


def chat(state: BoardState, run_id: str, prompt: str, *, system: str | None = None, max_new_tokens: int = 128) -> dict:
    """{"base", "tuned", "prompt"}: both answers to `prompt` and the templated prompt they were given."""
    from tuneforge.evaluate.generation import chat_prompt, generate_answers

    if not isinstance(prompt, str) or not prompt.strip():
        raise BoardError("chat: type a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS or (system and len(system) > MAX_PROMPT_CHARS):
        raise BoardError(f"chat: at most {MAX_PROMPT_CHARS:,} characters per message")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise BoardError(f"chat: max new tokens must be between 1 and {MAX_NEW_TOKENS}")
    path = state.run_path(run_id)
    with state.heavy:
        model, tokenizer, base = _models(path)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = chat_prompt(tokenizer, messages)
        tuned = generate_answers(model, tokenizer, [text], max_new_tokens=max_new_tokens)[0]
        if base is None:
            with model.disable_adapter():
                base_answer = generate_answers(model, tokenizer, [text], max_new_tokens=max_new_tokens)[0]
        else:
            base_answer = generate_answers(base, tokenizer, [text], max_new_tokens=max_new_tokens)[0]
    return {"run": run_id, "prompt": text, "tuned": tuned, "base": base_answer,
            "base_label": "base (adapter off)" if base is None else "base model"}
