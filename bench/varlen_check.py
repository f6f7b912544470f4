"""GPU check of speed.attention varlen (src/tuneforge/speed/varlen.py): the packed-row attention through torch's
varlen kernel against causal sdpa run on each example alone (outputs and gradients, bf16), and the time of one
attention call (forward + backward) for a packed row three ways: varlen, sdpa with the dense block-diagonal mask
transformers builds for padding-free rows, and per-example sdpa. Prints one JSON line.

    PYTHONPATH=src python3 bench/varlen_check.py [--tokens 8192] [--heads 32] [--kv-heads 8] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def packed_lengths(total: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.empty(1).log_normal_(5.9, 0.9, generator=generator).clamp(16, 2048)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def timed(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    from types import SimpleNamespace

    from tuneforge.speed import varlen

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    lengths = packed_lengths(args.tokens)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    shape_q, shape_kv = (1, args.heads, args.tokens, args.dim), (1, args.kv_heads, args.tokens, args.dim)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=args.heads // args.kv_heads, training=True)
    scale = args.dim ** -0.5

    def fast():
        return varlen.attention(module, q, k, v, None, scaling=scale, position_ids=positions)[0]

    def per_example():
        out, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            out.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2))
            start += n
        return torch.cat(out, dim=1)

    segment = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    causal = torch.ones(args.tokens, args.tokens, device="cuda", dtype=torch.bool).tril()
    dense_mask = (causal & (segment[:, None] == segment[None, :]))[None, None]

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale,
                                                                enable_gqa=True).transpose(1, 2)

    grad = torch.randn(1, args.tokens, args.heads, args.dim, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, fn in (("varlen", fast), ("per_example", per_example)):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad)
        results[name] = (out.detach().float(), [t.grad.float().clone() for t in (q, k, v)])
    out_diff = (results["varlen"][0] - results["per_example"][0]).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(results["varlen"][1], results["per_example"][1]))

    def step(fn):
        return lambda: fn().backward(grad)

    times = {name: round(timed(step(fn)), 3) for name, fn in (("varlen", fast), ("dense_mask_sdpa", dense),
                                                               ("per_example_sdpa", per_example))}
    kernel = varlen.varlen_kernel()
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "tokens": args.tokens,
                      "examples": len(lengths), "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
                      "varlen_params": sorted(kernel[1]) if kernel else None,
                      "max_abs_diff_out": out_diff, "max_abs_diff_grad": grad_diff,
                      "fwd_bwd_ms": times,
                      "speedup_vs_dense_mask": round(times["dense_mask_sdpa"] / times["varlen"], 2)}))


if __name__ == "__main__":
    main()
