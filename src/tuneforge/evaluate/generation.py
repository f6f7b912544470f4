"""Batched greedy generation with the chat template, as at inference."""

from __future__ import annotations


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 16,
                     progress=None, description: str = "generating") -> list[str]:
    """Greedy answers for already-templated prompts. Padding is on the left so every answer starts right after
    its prompt; special tokens are not added again (the template has them)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    task = progress.add_task(description, total=len(prompts)) if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(
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
    return answers
