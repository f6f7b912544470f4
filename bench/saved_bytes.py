"""What autograd keeps for the backward, per token, in one decoder layer of a LoRA model -- by LoRA dropout lever.

    python bench/saved_bytes.py [--tokens 256] [--out bench/results/...txt]

One Llama 3 8B-shaped decoder layer (hidden 4096, MLP 14336, 32 query / 8 key-value heads), random bf16 weights, LoRA
r16 alpha32 on all seven projections, dropout 0.05, under bf16 autocast on the CPU. The tensors autograd saves while
the layer runs forward are counted once each (distinct storages), leaving out the weights (anything without a token
dimension). CPU kernels differ from the GPU's in what they keep (transformers' RMSNorm, SwiGLU and sdpa here; Liger and
flash kernels on a GPU), so the absolute numbers are the CPU's; the differences between the dropout modes are
the adapters' own tensors, which are the same on both (except that CPU dropout masks are bool too).

Modes: peft (PEFT's forward), fused (speed.fused_lora, the default), mask (fused + speed.keep_lora_dropout_mask),
recompute (fused + speed.recompute_lora_dropout), and fused without dropout for reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODES = [("peft", 0.05), ("fused", 0.05), ("mask", 0.05), ("recompute", 0.05), ("fused", 0.0)]


def kept_bytes(mode: str, dropout: float, tokens: int) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.speed import fused_lora

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=256)
    config._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]))
    if mode != "peft":
        fused_lora.install(model, dropout_saves={"mask": "mask", "recompute": "recompute"}.get(mode))
    model.train()
    inner = model.base_model.model.model
    ids = torch.randint(0, 256, (1, tokens))
    kept: dict[int, int] = {}

    def pack(tensor):
        if tokens in tuple(tensor.shape):  # activations have a token dimension; weights do not
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = inner.embed_tokens(ids).detach().requires_grad_()
        positions = torch.arange(tokens)[None]
        rope = inner.rotary_emb(hidden, positions)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inner.layers[0](hidden, position_embeddings=rope, attention_mask=None, position_ids=positions)
    return sum(kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    base = None
    for mode, dropout in MODES:
        per_token = kept_bytes(mode, dropout, args.tokens) / args.tokens / 1024
        base = base or per_token
        rows.append(f"| {mode} | {dropout} | {per_token:.1f} | {per_token / base:.2f} | {per_token * 32 / 1024:.2f} |")
    text = "\n".join([
        f"# Kept for the backward per token, one Llama-8B-shaped LoRA decoder layer (CPU, bf16 autocast, "
        f"{args.tokens} tokens)",
        "#   python bench/saved_bytes.py" + (f" --tokens {args.tokens}" if args.tokens != 256 else ""), "",
        "| mode | LoRA dropout | KiB per token per layer | vs peft | MiB per token, 32 layers |",
        "| --- | ---: | ---: | ---: | ---: |", *rows])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
