"""speed.lora_autocast -- LoRA layers hand their 16-bit inputs straight to autocast.

Why this exists: PEFT keeps LoRA weights in fp32 over a bf16/fp16 base (for stable optimizer updates) and, before
every LoRA branch, casts the layer's input to the adapter's dtype: a full fp32 copy of the activations per adapted
projection (seven per decoder layer), dropout over that fp32 copy, and then autocast -- on in mixed-precision
training -- casts it back to 16 bits for the matmul anyway. The arithmetic of the branch is the same without the
round trip (the matmul runs in 16 bits either way); only dropout's scaling is rounded once in 16 bits instead of in
fp32. The H100 profile of an 8B LoRA step put 16 % of GPU time in these copies (bench/results/*-speed-h100.md).

PEFT exposes the switch (`cast_input_dtype_enabled`, used by `peft.helpers.disable_input_dtype_casting`); a
context manager cannot span a Trainer run, so a forward pre-hook on each LoRA layer sets it per call: no cast while
autocast is on, PEFT's cast when it is off (generation and evaluation outside the Trainer keep working unchanged).
"""

from __future__ import annotations


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "lora_variant", None):  # DoRA & co: PEFT's path
            yield module


def _skip_cast_under_autocast(module, args):
    import torch

    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


def install(model) -> int:
    """Install the pre-hook on every plain LoRA layer whose adapter weights are wider than its base weights (fp32
    over bf16/fp16); returns how many layers got it. Idempotent."""
    touched = 0
    for module in _lora_layers(model):
        base = getattr(module.get_base_layer(), "weight", None)
        adapters = [layer.weight for layer in module.lora_A.values()]
        if base is None or not adapters or not base.dtype.is_floating_point:
            continue  # 4-bit bases store uint8: QLoRA's adapters run in the compute dtype already
        if all(w.dtype.itemsize <= base.dtype.itemsize for w in adapters):
            continue
        if not getattr(module, "_tuneforge_lora_autocast", False):
            module.register_forward_pre_hook(_skip_cast_under_autocast)
            module._tuneforge_lora_autocast = True
        touched += 1
    return touched
