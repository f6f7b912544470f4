"""speed.fused_lora -- the LoRA update folded into one matmul: result + scaling * (A x) B^T as a single addmm.

Why this exists: PEFT's LoRA Linear computes `result + lora_B(lora_A(dropout(x))) * scaling`: after the small B
matmul, one elementwise pass multiplies by `scaling` and another adds the base layer's output -- two reads and writes
of a [tokens x out_features] tensor per adapted projection (seven per decoder layer), and the same again in the
backward. `torch.addmm(result, h, B^T, alpha=scaling)` does the scale and the add in the matmul's epilogue. On the
8B LoRA profile those elementwise passes were ~10 % of GPU time (bench/results/profiles/2026-11-25-8b-lora-default.txt).
Under autocast the fast path also skips PEFT's cast of the input to the adapter's fp32 (a full copy of the
activations per adapted projection, which autocast casts straight back to 16 bits for the matmul).

Only plain LoRA takes this path: one active adapter, no DoRA/other variant, no LoRA bias, not merged, no per-example
adapter names, and dtypes that agree (autocast on, or input, adapter and base output in one dtype). Anything else
runs PEFT's own forward, unchanged. The result is the same sum, rounded once instead of twice
(tests/test_speed.py checks it against PEFT's forward, values and gradients).

QLoRA's 4-bit LoRA layers (PEFT's bnb Linear4bit) take it too with `speed.fused_lora: true` (auto leaves QLoRA to
PEFT until this is measured on a GPU: bench/levers_gpu.sh), under autocast: PEFT's forward there also clones the
4-bit base output ("defensively", a full copy) before the multiply and the add; addmm is out of place, so no clone is
needed. Their base output keeps the input's dtype (the fp32 residual stream prepare_model_for_kbit_training leaves),
so the addmm runs in that dtype, autocast off: the base output is not rounded to 16 bits on the way.
"""

from __future__ import annotations

import types


def _fast_path_ok(layer, x, kwargs) -> bool:
    import torch

    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return False
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or getattr(layer, "lora_variant", None):
        return False
    name = active[0]
    if layer.lora_bias.get(name, False) or getattr(layer.lora_B[name], "bias", None) is not None:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    base = getattr(layer.get_base_layer(), "weight", None)
    return base is not None and x.dtype == base.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype


def _forward(self, x, *args, **kwargs):
    import torch

    if not _fast_path_ok(self, x, kwargs):
        return self._tuneforge_peft_forward(x, *args, **kwargs)
    for key in ("adapter_names", "alora_offsets"):
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout, lora_a = self.lora_dropout[name], self.lora_A[name]
    weight = self.lora_B[name].weight  # [out, r]
    if self._tuneforge_4bit:  # QLoRA: PEFT's dropout and A; the update added in the base output's dtype
        h = lora_a(dropout(x))
        with torch.autocast(x.device.type, enabled=False):
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                              weight.t().to(result.dtype), alpha=self.scaling[name])
        return out.view(result.shape)
    saves = getattr(self, "_tuneforge_dropout_saves", None)
    if (saves and isinstance(dropout, torch.nn.Dropout) and dropout.training and 0 < dropout.p < 1
            and lora_a.bias is None):
        from tuneforge.speed.lora_dropout import dropout_lora_a, masked_lora_a

        # keeps x (and the mask, or the generator state), not the dropped-out copy (speed/lora_dropout.py)
        h = (masked_lora_a if saves == "mask" else dropout_lora_a)(x, lora_a.weight, dropout.p)
    else:
        h = lora_a(dropout(x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def install(model, dropout_saves: str | None = None) -> int:
    """Give every LoRA Linear layer of `model` the fused forward (falls back to PEFT's per call); idempotent.
    dropout_saves: what the adapter's input dropout keeps for the backward instead of the dropped-out copy --
    "mask" (speed.keep_lora_dropout_mask) or "recompute" (speed.recompute_lora_dropout: drawn again); None = PEFT's
    dropout. Returns the number of layers."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: no 4-bit layers either
        Linear4bit = None
    count = 0
    for module in model.modules():
        four_bit = Linear4bit is not None and type(module) is Linear4bit
        if type(module) is not LoraLinear and not four_bit:  # 8-bit and other LoRA layers: left to PEFT
            continue
        if not hasattr(module, "_tuneforge_peft_forward"):
            module._tuneforge_peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
        module._tuneforge_4bit = four_bit
        module._tuneforge_dropout_saves = None if four_bit else dropout_saves
        count += 1
    return count
