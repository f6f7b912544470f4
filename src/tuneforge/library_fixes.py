"""Workarounds for bugs in the libraries we build on, each in one place with the reason. Remove one when the
library version that fixes it becomes our minimum.
"""

from __future__ import annotations


def keep_bnb_cpu_weights_trainable(model) -> int:
    """bitsandbytes (0.50) on CPUs with AVX512-BF16: the first forward in eval mode without gradients (e.g. our
    baseline evaluation before training) repacks every 4-bit weight into an inference-only layout, and every
    later forward, training included, then runs `gemv_4bit`, which has no autograd kernel: gradients flowing
    back through the frozen base to earlier LoRA layers are silently wrong (torch only warns). We switch the
    repacking off for the model's Linear4bit layers, and undo it where it already happened. Returns the number
    of layers touched."""
    touched = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        touched += 1
    return touched


def checkpointing_field(enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def quiet_library_notices() -> None:
    """Notices the libraries print on every run that a user can do nothing about (each explained below); the
    quickstart's output stays clean. Warnings that point at a real problem are left alone."""
    import warnings

    quiet_bitsandbytes_cpu_kernel_notice()
    # transformers 5.x renamed `is_gradient_checkpointing`; TRL (1.16) and PEFT (0.21) still read the old name on every
    # trainer set-up, so each run printed a FutureWarning addressed to those libraries' authors.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def quiet_bitsandbytes_cpu_kernel_notice() -> None:
    """bitsandbytes (0.49+) on CPUs with AVX512-BF16 tries, when first imported, to fetch an optional 4-bit GEMM
    kernel from the hub ("kernels-community/quantization-bitsandbytes"); where that is not possible it logs a warning
    about "publisher trust status" and falls back to its own kernel, which is what tuneforge uses anyway. Every
    LoRA run on such a CPU printed it (transformers imports bitsandbytes even when nothing is quantized); its logger
    is set to errors only. Call before bitsandbytes is imported."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def soft_prompt_generate(model, input_ids, attention_mask, **kwargs):
    """Greedy generation for a PEFT prompt-learning model (prompt tuning, P-tuning, prefix tuning), as its forward
    computes it. Why: with PEFT 0.21 on transformers 5.x, PeftModelForCausalLM.generate does not: a prefix-tuned run's
    answers came out as the base model's (the prefix never reached the cache), and a P-tuned run's first token was
    right and the rest garbage, while a no-cache greedy loop over the same model's forward gave the trained answers
    (found on the CPU comparison matrix, bench/results/2026-12-07-compare-cpu.md). Here transformers' own generate
    runs on the base model, with the soft prompt applied as PEFT's forward applies it: virtual token embeddings in
    front of the prompt's (prompt tuning, P-tuning), or the prefix as the starting cache (prefix tuning); the
    attention mask grows by the virtual tokens either way. Returns [input_ids ; new tokens], as generate does."""
    import torch
    from peft import PeftType

    config = model.active_peft_config
    batch = input_ids.shape[0]
    virtual = torch.ones(batch, config.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([virtual, attention_mask], dim=1)
    base = model.get_base_model()
    if config.peft_type == PeftType.PREFIX_TUNING:
        return base.generate(input_ids=input_ids, attention_mask=mask, past_key_values=model.get_prompt(batch),
                             **kwargs)
    prompts = model.get_prompt(batch_size=batch).to(model.word_embeddings.weight.dtype)
    embeds = torch.cat([prompts, model.word_embeddings(input_ids)], dim=1)
    new = base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)  # only the new tokens come back
    return torch.cat([input_ids, new], dim=1)


def is_soft_prompt_model(model) -> bool:
    """A PEFT model whose active adapter is a prompt-learning one (soft_prompt_generate applies)."""
    return bool(getattr(model, "active_peft_config", None) is not None
                and getattr(model.active_peft_config, "is_prompt_learning", False))
