"""Batched greedy generation with the chat template, as at inference. Prompts longer than the model's context (less
the tokens to generate) keep their last tokens -- the end of a templated prompt is the question and the assistant
header -- so one huge held-out example cannot exhaust memory at scoring; how many were cut is counted."""

from __future__ import annotations

# A prompt is cut to its last `limit * CHARS_PER_TOKEN_BOUND` characters before it is tokenized, so a 50 MB example is
# never tokenized whole; the token cut that follows is exact.
CHARS_PER_TOKEN_BOUND = 16


def context_limit(model, tokenizer, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for `max_new_tokens` in the model's context; None when unknown."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not context:
        length = getattr(tokenizer, "model_max_length", None)
        context = length if isinstance(length, int) and length < 10**7 else None
    return max(1, int(context) - max_new_tokens) if context else None


def encode_prompts(tokenizer, prompts: list[str], limit: int | None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (no special tokens added: the template has them), each cut to its last `limit`
    tokens; and how many were cut."""
    ids, cut = [], 0
    for prompt in prompts:
        if limit is not None and len(prompt) > limit * CHARS_PER_TOKEN_BOUND:
            prompt = prompt[-limit * CHARS_PER_TOKEN_BOUND:]
        tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if limit is not None and len(tokens) > limit:
            tokens, cut = tokens[-limit:], cut + 1
        ids.append(tokens)
    return ids, cut


def chat_prompt(tokenizer, messages: list[dict], *, where: str = "") -> str:
    """The prompt `generate`, `chat` and `serve` answer: the conversation through the chat template with the
    assistant header, or (a model without a template) the last message as it is."""
    from tuneforge.data.template import render_chat

    if not tokenizer.chat_template:
        return messages[-1]["content"]
    return render_chat(tokenizer, messages, add_generation_prompt=True, where=where)


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 16,
                     progress=None, description: str = "generating", stats: dict | None = None) -> list[str]:
    """Greedy answers for already-templated prompts. Padding is on the left so every answer starts right after
    its prompt. `stats`, when given, gets "truncated_prompts": how many prompts were cut to the context."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    limit = context_limit(model, tokenizer, max_new_tokens)
    answers: list[str] = []
    truncated = 0
    task = progress.add_task(description, total=len(prompts)) if progress is not None else None
    was_training = model.training
    model.eval()
    from tuneforge.library_fixes import is_soft_prompt_model, soft_prompt_generate

    generate = (lambda **kw: soft_prompt_generate(model, **kw)) if is_soft_prompt_model(model) else model.generate
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids, cut = encode_prompts(tokenizer, batch, limit)
            truncated += cut
            encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                output = generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=model.generation_config.eos_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if task is not None:
                progress.advance(task, len(batch))
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    if stats is not None:
        stats["truncated_prompts"] = stats.get("truncated_prompts", 0) + truncated
    return answers
