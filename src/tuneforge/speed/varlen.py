"""speed.attention: varlen -- attention for padding-free batches that never builds a mask.

Why this exists: transformers' sdpa path turns a padding-free micro-batch (one row of several examples, position ids
restarting at each) into a dense [tokens x tokens] block-diagonal mask, checks it with a device sync, and PyTorch's
masked sdpa cannot use the flash kernel, so every layer attends over the whole merged row and cuDNN re-plans for each
new length (bench/results/2026-11-24-speed-h100.md, profile). flash-attn's varlen kernel avoids all of that but is not
installed everywhere (it was not on the benchmark machine). PyTorch >= 2.10 ships the same kind of kernel as
`torch.nn.attention.varlen.varlen_attn`; this module registers it with transformers under the name "varlen":

  - the mask function returns None when the batch has no padding (so no dense mask is built); with padding (eval
    batches, generation) it is transformers' sdpa mask and attention is transformers' sdpa, unchanged;
  - the attention function takes the example boundaries the padding-free collator sends (cu_seq_lens_q and
    max_length_q, TRL's collator does), else reads them from the position ids once per forward (cached on the
    position-ids tensor, which every layer receives), and calls varlen_attn on CUDA; on CPU, where varlen_attn has no
    kernel, it runs causal sdpa on each example in turn (the same arithmetic; tests/test_speed.py checks it against
    the plain path).
"""

from __future__ import annotations

import functools
import inspect

NAME = "varlen"
_last: dict = {}


@functools.lru_cache(maxsize=1)
def varlen_kernel():
    """torch's varlen_attn and its keyword names, or None where this torch has none (looked up once: it is read by
    every attention call)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def available(device: str) -> bool:
    return device == "cuda" and varlen_kernel() is not None


def boundaries(position_ids):
    """(cu_seqlens int32, longest example) of a packed row, or None if the row is one example. Computed once per
    forward: the same position-ids tensor reaches every layer (and the recomputation under checkpointing)."""
    import torch

    if _last.get("key") is position_ids:
        return _last["value"]
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    if starts.numel() <= 1 and flat[0] == 0:
        value = None
    else:
        if starts.numel() == 0 or starts[0] != 0:
            starts = torch.cat([starts.new_zeros(1), starts])
        cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        value = (cu, int((cu[1:] - cu[:-1]).max()))
    _last.clear()
    _last.update(key=position_ids, value=value)
    return value


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: query/key/value [batch, heads, tokens, dim] -> ([batch, tokens, heads, dim], None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (attention_mask is None and position_ids is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] and position_ids.shape[-1] == query.shape[2])
    given = kwargs.get("cu_seq_lens_q")
    if packed and given is not None and kwargs.get("max_length_q") is not None:
        # TRL's padding-free collator already sends the boundaries: no device sync to find them
        found = (given.to(device=query.device, dtype=torch.int32), int(kwargs["max_length_q"]))
    else:
        found = boundaries(position_ids) if packed else None
    if found is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cu, longest = found
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    kernel = varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        varlen_attn, params = kernel
        options = {"scale": scaling}
        if "is_causal" in params:
            options["is_causal"] = True
        else:
            options["window_size"] = (-1, 0)
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                options["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # e.g. QLoRA's fp32 activations: the kernel takes 16-bit
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = (t.to(half) for t in (q, k, v))
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **options).to(dtype)
    else:
        bounds = cu.tolist()
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
        out = torch.cat(parts)
    return out.unsqueeze(0), None


def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
         **kwargs):
    """No mask for a batch without padding (varlen handles the boundaries); transformers' sdpa mask otherwise."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function or causal_mask_function, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make attn_implementation="varlen" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
