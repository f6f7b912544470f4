"""speed.lora_dropout_saves -- what LoRA's input dropout keeps for the backward, inside the fused LoRA forward.

  mask       (speed.keep_lora_dropout_mask) dropout and the A matmul as one autograd function that keeps the input
             (which the base layer keeps anyway) and dropout's mask packed 8 elements to a byte (1 bit each; a
             feature count not divisible by 8 keeps torch's 1-byte mask), and applies the mask again in the
             backward; the dropped-out 16-bit copy is not kept. Same masks as PEFT's dropout (torch's own
             native_dropout draws them), so the step is PEFT's to rounding on CPU and GPU alike; the packing and
             one extra elementwise pass per projection cost a few small kernels.
  recompute  (speed.recompute_lora_dropout) keeps only the input and the random-number state, and draws the
             same mask again in the backward.

Why this exists: PEFT computes lora_A(dropout(x)) per adapted projection. Autograd then keeps, for each of the seven
projections of a decoder layer, the dropped-out copy of the input (16 bits per element, for A's gradient) and the
mask -- q, k and v each their own copy of the same x, and the MLP's down projection one of its 14,336-wide input.
For Llama 8B that is ~117 KB per token per layer (3.7 MB per token over 32 layers); keeping the inputs instead
(one for q, k and v, one for gate and up, the attention output, the down projection's input) is ~52 KB: about 2 MB
per token less, roughly a third of what a LoRA step without checkpointing keeps (estimates from the layer shapes; the
H200 bench measured 83.6 GiB for tuneforge without checkpointing against Unsloth's 64.6). Besides the inputs, only a
few bytes of generator state are kept.

The mask is drawn as torch's CPU dropout draws it (bernoulli_ on a tensor shaped and typed like the input), so on CPU
the step is PEFT's to rounding (tests/test_speed.py); on CUDA the mask is equally distributed but not the same bits as
torch's fused dropout kernel. Activation checkpointing restores the generator state before recomputing a layer, so
the recomputed forward draws the same masks.

Measured (bench/results/2026-12-07-speed-fair-h100-qwen-1bfull.md, H100, Qwen2 1.5B LoRA, no checkpointing, against
the lever off in the same call): peak memory 24.5 instead of 32.4 GiB, step rate 0.72x. The extra cost is the full-size
noise drawn twice per projection and applied in separate passes (and the generator state swapped per draw); a kernel
that generates the mask inside the A matmul would remove it. So this is a memory lever, off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# imported only from the fused LoRA forward (speed/fused_lora.py), when the lever is on


def _generator_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _draw(x, p: float, state=None):
    """0/1 noise shaped and typed like x (the kept elements are 1), drawn from `state` if given (the generator's
    own state is left as it was)."""
    if state is None:
        return torch.empty_like(x).bernoulli_(1 - p)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type if devices else "cuda"):
        if x.device.type == "cuda":
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return torch.empty_like(x).bernoulli_(1 - p)


class DropoutLoraA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p, compute_dtype):
        state = _generator_state(x.device)
        dropped = (x * _draw(x, p)).mul_(1.0 / (1.0 - p))
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(dropped.to(compute_dtype), weight.to(compute_dtype))
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.p, ctx.compute_dtype = state, p, compute_dtype
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        noise = _draw(x, ctx.p, ctx.state)
        scale = 1.0 / (1.0 - ctx.p)
        g = grad_h.to(ctx.compute_dtype)
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                dropped = (x * noise).mul_(scale).to(ctx.compute_dtype)
                grad_w = (g.reshape(-1, g.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.to(ctx.compute_dtype)).to(x.dtype).mul_(noise).mul_(scale)
        return grad_x, grad_w, None, None


_BITS = None


def _bit_weights(device):
    global _BITS
    if _BITS is None or _BITS.device != device:
        _BITS = (2 ** torch.arange(8, dtype=torch.uint8)).to(device)
    return _BITS


def pack_mask(mask):
    """A bool mask as bits, 8 to a byte along the last dimension (None when that is not divisible by 8)."""
    if mask.shape[-1] % 8:
        return None
    bits = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 8, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_mask(packed, shape):
    return (packed.unsqueeze(-1) & _bit_weights(packed.device)).ne(0).reshape(shape)


class MaskedLoraA(torch.autograd.Function):
    """lora_A(dropout(x)) keeping x and dropout's mask, packed to bits (not the dropped-out copy), for the backward."""

    @staticmethod
    def forward(ctx, x, weight, p, compute_dtype):
        dropped, mask = torch.ops.aten.native_dropout(x, p, True)  # what F.dropout runs: the same draw
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(dropped.to(compute_dtype), weight.to(compute_dtype))
        packed = pack_mask(mask)
        ctx.save_for_backward(x, weight, mask if packed is None else packed)
        ctx.p, ctx.compute_dtype, ctx.packed = p, compute_dtype, packed is not None
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, mask = ctx.saved_tensors
        if ctx.packed:
            mask = unpack_mask(mask, x.shape)
        scale = 1.0 / (1.0 - ctx.p)
        g = grad_h.to(ctx.compute_dtype)
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                dropped = torch.ops.aten.native_dropout_backward(x, mask, scale).to(ctx.compute_dtype)
                grad_w = (g.reshape(-1, g.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.native_dropout_backward((g @ weight.to(ctx.compute_dtype)).to(x.dtype),
                                                                mask, scale)
        return grad_x, grad_w, None, None


def masked_lora_a(x, weight, p: float):
    """lora_A(dropout(x)) with weight [r, in], keeping x and the mask (as bits) for the backward (see MaskedLoraA)."""
    kind = x.device.type
    compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    return MaskedLoraA.apply(x, weight, p, compute_dtype)


def dropout_lora_a(x, weight, p: float):
    """lora_A(dropout(x)) with weight [r, in], keeping only x and the generator state for the backward. Under autocast
    the matmul runs in autocast's dtype, as the nn.Linear it replaces would."""
    kind = x.device.type
    compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    return DropoutLoraA.apply(x, weight, p, compute_dtype)
