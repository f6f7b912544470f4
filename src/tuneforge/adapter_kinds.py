"""The adaptation menu as data: every `adapter.type`, the `adapter.*` keys each one reads, its learning-rate scale and
default optimizer, and what it supports (4-bit base, merge, resume). Pure data at the floor of the layers (no
tuneforge imports), so the schema (recipe_adapter.py), the method registry (learning rates), the memory model and the
adapters (adapters.py, adapter_peft.py, full_savers.py, bottleneck.py) all read one table.

Families (seeds 000 step 13, 001 families B and C, 002 §1, 003 "adapter selection"):
  low-rank      lora, qlora (LoRA on a 4-bit base), adalora (adaptive rank budget across layers)
  scaling       ia3 (learned scalars on keys, values and the feed-forward input: "even smaller than LoRA")
  soft prompts  prompt_tuning (virtual tokens at the input), prefix_tuning (virtual keys/values in every layer; with
                prefix_projection: the P-tuning v2 deep prompt), p_tuning (virtual tokens from a prompt encoder)
  structural    bottleneck (down-project, ReLU, up-project, residual after each block's MLP; bottleneck.py)
  full, saving  galore (low-rank projected optimizer states), lisa (a few random layers unfrozen per interval),
                spectrum (the layers with the highest signal-to-noise unfrozen), freeze (named layers only)
  full          full / none (every weight)
"""

from __future__ import annotations

LORA_TYPES = ("lora", "qlora")
SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning", "p_tuning")
PEFT_TYPES = (*LORA_TYPES, "adalora", "ia3", *SOFT_PROMPTS)  # saved as adapter/ that plain PEFT loads back
FULL_SAVERS = ("galore", "lisa", "spectrum", "freeze")  # full-parameter training with less memory; saved as model/
ADAPTER_TYPES = (*PEFT_TYPES, "bottleneck", *FULL_SAVERS, "full", "none")
NEW_TYPES = ("adalora", "ia3", *SOFT_PROMPTS, "bottleneck", *FULL_SAVERS)  # the supervised-family types (issue 23)

# Which adapter.* keys each type reads; a key set to a non-default value for a type that does not read it is a
# recipe error naming the key. `type` and `quantize_base` are checked separately.
_LORA = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "use_dora", "use_rslora", "init", "bias")
READS: dict[str, tuple[str, ...]] = {
    "lora": _LORA,
    "qlora": _LORA,
    "adalora": ("alpha", "dropout", "target_modules", "modules_to_save", "bias", "init_r", "target_r", "tinit",
                "tfinal", "deltaT", "total_step"),
    "ia3": ("target_modules", "feedforward_modules", "modules_to_save"),
    "prompt_tuning": ("num_virtual_tokens", "prompt_init_text"),
    "prefix_tuning": ("num_virtual_tokens", "prefix_projection", "prefix_init", "encoder_hidden_size"),
    "p_tuning": ("num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type"),
    "bottleneck": ("bottleneck_reduction", "dropout"),
    "galore": ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_target_modules"),
    "lisa": ("lisa_layers", "lisa_interval"),
    "spectrum": ("spectrum_top_fraction",),
    "freeze": ("trainable_layers", "trainable_modules"),
    "full": (),
    "none": (),
}

# A 4-bit (or 8-bit) base under the adapter (QLoRA-style, quant.*): types that keep the base frozen and train
# their own parameters beside it. The full-parameter types update the base weights themselves, which cannot be
# 4-bit; bottleneck is tuneforge's own module and is not tested on bitsandbytes layers.
QUANTIZABLE = ("lora", "qlora", "adalora", "ia3", *SOFT_PROMPTS)
MERGEABLE = ("lora", "qlora", "adalora", "ia3")  # PEFT's merge_and_unload; soft prompts and bottlenecks cannot
SAVED_AS_MODEL = (*FULL_SAVERS, "full", "none")  # model/ (full weights); the rest save adapter/

# Default learning rate relative to LoRA's (the method's `lr["lora"]`), for the types that train only their own
# parameters; the full-parameter types take the method's full fine-tuning rate. IA3: 3e-3 (IA3 paper, T-Few);
# prompt tuning 3e-2 and prefix/P-tuning 1e-2 (PEFT's documented examples: soft prompts need large steps);
# bottleneck 1e-4 (AdapterHub's documented default); AdaLoRA as LoRA (PEFT's examples).
# P-tuning v2 (prefix_tuning with prefix_projection) 1e-3: at prefix tuning's 1e-2 its MLP diverged on the embedded
# model at the third step (loss 0.5 -> 25), at 1e-3 it fell 0.73 -> 0.02 in 20 steps (bench/results/2026-12-07-compare-cpu.md).
LR_SCALE = {"ia3": 15.0, "prompt_tuning": 150.0, "prefix_tuning": 50.0, "p_tuning": 50.0, "bottleneck": 0.5,
            "adalora": 1.0, "lora": 1.0, "qlora": 1.0, "ptuning_v2": 5.0}


def lr_type(adapter) -> str:
    """The LR_SCALE key of an adapter section: its type, or ptuning_v2 for prefix tuning with prefix_projection."""
    return "ptuning_v2" if adapter.type == "prefix_tuning" and adapter.prefix_projection else adapter.type


def lr_kind(adapter_type: str) -> tuple[str, float]:
    """("lora" | "full", scale): which of a method's learning rates a type starts from, and by what factor."""
    if adapter_type in LR_SCALE:
        return "lora", LR_SCALE[adapter_type]
    return "full", 1.0


def frozen_base(adapter_type: str) -> bool:
    """The base weights stay frozen (the adapter trains its own parameters)."""
    return adapter_type not in SAVED_AS_MODEL
