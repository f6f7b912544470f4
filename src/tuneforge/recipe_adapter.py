"""The recipe's `adapter:` section: which adaptation method trains (adapter_kinds.py lists them) and its knobs.

Every key belongs to the types that read it (`adapter_kinds.READS`): a key set to a non-default value for a type that
does not read it is a recipe error naming the key and the types that do. `adapter_problems(recipe)` holds the checks
that need the rest of the recipe (the method, quant, train.*), called by `Recipe.resolve_defaults`; the checks that
need the model (a soft prompt longer than its context) are in adapter_checks.py, before the run directory exists.

Defaults, with their sources: LoRA r=16, alpha=32 (seed 000); AdaLoRA init_r=12, target_r=8 (PEFT's and the AdaLoRA
paper's defaults); soft prompts 20 virtual tokens (PEFT's prompt/prefix tuning examples; the prefix-tuning paper
uses 10-200); GaLore rank 128, projection refreshed every 200 steps, scale 0.25 (the GaLore paper's fine-tuning
settings); LISA 2 layers every 20 steps (the LISA paper's gamma=2 and LMFlow's lisa_interval_steps=20); Spectrum the
top 25% of layers by signal-to-noise (the Spectrum paper's "Spectrum-25"); freeze: the last 2 layers
(LLaMA-Factory's freeze_trainable_layers=2); bottleneck reduction factor 16 (AdapterHub's default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.adapter_kinds import ADAPTER_TYPES, NEW_TYPES, QUANTIZABLE, READS, SOFT_PROMPTS
from tuneforge.recipe_base import KeyedValueError, Section

MAX_LORA_RANK = 4096  # a rank above every layer's size adapts nothing more than full fine-tuning; doctor checks the model's
MAX_VIRTUAL_TOKENS = 4096

AdapterType = Literal[ADAPTER_TYPES]  # type: ignore[valid-type]


class AdapterSection(Section):
    type: AdapterType = Field(
        "lora", description="lora | qlora (LoRA on a 4-bit base) | adalora | ia3 | prompt_tuning | prefix_tuning | "
        "p_tuning | bottleneck | galore | lisa | spectrum | freeze | full (all weights) | none (same as full).")
    quantize_base: bool = Field(False, description="Load the base in 4-bit (quant.*) under this adapter, QLoRA-style: "
                                f"for {', '.join(t for t in QUANTIZABLE if t not in ('lora', 'qlora'))} "
                                "(qlora is lora with this on).")
    r: int = Field(16, gt=0, le=MAX_LORA_RANK, description="LoRA rank (seed 000: r=16 is the common default; at most "
                   f"{MAX_LORA_RANK}, and doctor checks it against the model's layer sizes).")
    alpha: int = Field(32, gt=0, description="LoRA/AdaLoRA alpha; the update is scaled by alpha/r (convention alpha = 2r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA/AdaLoRA branch (bottleneck: inside it).")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer but the output head); "
        "ia3: left at all-linear means PEFT's per-model default (k_proj, v_proj, down_proj for Llama)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully beside LoRA, e.g. [embed_tokens, lm_head] for new tokens."
    )
    use_dora: bool = Field(False, description="DoRA: magnitude + direction decomposition of the update.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r), steadier at high rank.")
    init: Literal["default", "pissa", "olora"] = Field("default", description="LoRA init: zeros for B, or PiSSA / OLoRA.")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="LoRA/AdaLoRA: which biases train: none | all (every bias of the model) | lora_only (the "
        "biases of adapted layers). Trained biases change the base's output even with the adapter off.")
    # AdaLoRA (rank budget reallocated during training by importance)
    init_r: int = Field(12, gt=0, le=MAX_LORA_RANK, description="AdaLoRA: starting rank of every adapted layer.")
    target_r: int = Field(8, gt=0, le=MAX_LORA_RANK, description="AdaLoRA: average rank kept after pruning.")
    tinit: int = Field(0, ge=0, description="AdaLoRA: steps of warmup before the budget is pruned.")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: last steps trained at the final budget.")
    deltaT: int = Field(1, gt=0, description="AdaLoRA: steps between two budget reallocations.")
    total_step: int | None = Field(None, gt=0, description="AdaLoRA: the schedule's step count; filled in from "
                                   "train.max_steps or epochs x the data when absent.")
    # IA3
    feedforward_modules: list[str] | None = Field(None, description="IA3: the target modules whose input is scaled "
                                                  "(feed-forward); default PEFT's per-model list (down_proj for Llama).")
    # soft prompts
    num_virtual_tokens: int = Field(20, gt=0, le=MAX_VIRTUAL_TOKENS, description="Soft prompts: virtual tokens "
                                    "(prompt tuning: at the input; prefix/P-tuning: per layer or from an encoder).")
    prompt_init_text: str | None = Field(None, min_length=1, description="Prompt tuning: start the virtual tokens from "
                                         "this text's embeddings (e.g. 'Classify the sentiment:'); none: random.")
    prefix_projection: bool = Field(False, description="Prefix tuning: reparameterise the prefix through a 2-layer "
                                    "MLP (P-tuning v2 / the prefix-tuning paper's stable training).")
    prefix_init: Literal["zero", "random"] = Field("zero", description="Prefix tuning: zero = PEFT's no-op start "
                                                   "(zero keys/values, or a zero last projection layer); random = "
                                                   "PEFT's default, which on a pretrained model started the loss at "
                                                   "11.5 against the base's 0.47 (bench/results/2026-12-07-compare-cpu.md).")
    encoder_hidden_size: int | None = Field(None, gt=0, description="Prefix projection / P-tuning encoder width "
                                            "(default: the model's hidden size).")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="P-tuning prompt encoder.")
    # bottleneck
    bottleneck_reduction: int = Field(16, gt=0, description="Bottleneck adapter width = hidden size / this (AdapterHub).")
    # full-parameter memory savers
    galore_rank: int = Field(128, gt=0, description="GaLore: rank of the projected gradients / optimizer states.")
    galore_update_proj_gap: int = Field(200, gt=0, description="GaLore: steps between projection refreshes (SVD).")
    galore_scale: float = Field(0.25, gt=0, description="GaLore: scale of the projected update.")
    galore_target_modules: list[str] = Field(default_factory=lambda: ["attn", "mlp"], description="GaLore: name "
                                             "patterns of the 2-D weights whose optimizer states are projected.")
    lisa_layers: int = Field(2, gt=0, description="LISA: decoder layers unfrozen at a time (embeddings and the head "
                             "always train).")
    lisa_interval: int = Field(20, gt=0, description="LISA: optimizer steps between two random layer choices.")
    spectrum_top_fraction: float = Field(0.25, gt=0, le=1, description="Spectrum: share of each kind of layer "
                                         "(q_proj, ..., down_proj) unfrozen, by weight signal-to-noise ratio.")
    trainable_layers: int | list[int] = Field(2, description="freeze: an int N trains the last N decoder layers; a "
                                              "list names layer indices (negative from the end).")
    trainable_modules: list[str] = Field(default_factory=list, description="freeze: within the trainable layers, "
                                         "only parameters whose name contains one of these (e.g. [mlp]); [] = all.")

    @model_validator(mode="after")
    def _knobs_of_this_type(self) -> AdapterSection:
        reads = set(READS[self.type])
        defaults = type(self).model_fields
        for key in defaults:
            if key in ("type", "quantize_base") or key in reads:
                continue
            default = defaults[key].get_default(call_default_factory=True)
            if getattr(self, key) != default:
                users = [t for t, keys in READS.items() if key in keys]
                raise KeyedValueError(f"adapter.{key}", f"is not read by adapter.type {self.type} (it is for "
                                      f"{', '.join(users)}); remove it, or set adapter.type to one of those")
        if self.quantize_base and self.type not in QUANTIZABLE:
            why = ("GaLore updates every base weight, which cannot be 4-bit" if self.type == "galore" else
                   f"{self.type} trains the base weights themselves" if self.type not in ("bottleneck",) else
                   "tuneforge's bottleneck adapter is not built for bitsandbytes layers")
            raise KeyedValueError("adapter.quantize_base", f"a 4-bit base does not work with adapter.type {self.type}: "
                                  f"{why}; set quantize_base: false, or use one of {', '.join(QUANTIZABLE)}")
        if self.type == "adalora":
            if self.target_r > self.init_r:
                raise KeyedValueError("adapter.target_r", f"AdaLoRA prunes from init_r ({self.init_r}) down to "
                                      f"target_r ({self.target_r}); set target_r <= init_r")
            if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
                raise KeyedValueError("adapter.tinit", f"AdaLoRA's tinit + tfinal ({self.tinit} + {self.tfinal}) must "
                                      f"leave steps to prune in within total_step {self.total_step}; lower them")
        if self.type == "freeze" and isinstance(self.trainable_layers, int) and self.trainable_layers <= 0:
            raise KeyedValueError("adapter.trainable_layers", "the number of last layers to train must be at least 1")
        if self.type == "freeze" and isinstance(self.trainable_layers, list) and not self.trainable_layers:
            raise KeyedValueError("adapter.trainable_layers", "an empty list trains nothing; name layer indices")
        return self

    @property
    def quantized(self) -> bool:
        """The base is loaded 4-bit/8-bit (quant.*): qlora, or quantize_base under another type."""
        return self.type == "qlora" or self.quantize_base


def adalora_steps(recipe, examples: int | None = None) -> int | None:
    """AdaLoRA's schedule length: adapter.total_step, train.max_steps, or epochs x optimizer steps per epoch."""
    import math

    if recipe.adapter.total_step:
        return recipe.adapter.total_step
    if recipe.train.max_steps:
        return recipe.train.max_steps
    if examples is None:
        return None
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    return max(1, math.ceil(recipe.train.epochs * math.ceil(examples / per_step)))


def adapter_problems(recipe) -> list[tuple[str, str]]:
    """(key, problem) for adapter choices the rest of the recipe cannot honour (Recipe.resolve_defaults raises the
    first). Runs on every recipe, so it stays cheap: no model, no data."""
    from tuneforge.methods import method_spec

    a, problems = recipe.adapter, []
    spec = method_spec(recipe.method)
    if a.type in NEW_TYPES and spec.family != "supervised":
        problems.append(("adapter.type", f"{a.type} is wired for the supervised methods (sft, cpt, dft ...); method "
                         f"{recipe.method} trains lora, qlora or full: set adapter.type to one of those"))
    if a.type == "galore" and not str(recipe.train.optimizer or "galore").startswith("galore"):
        problems.append(("train.optimizer", f"adapter.type galore is GaLore's optimizer; {recipe.train.optimizer} "
                         "would train every weight with full optimizer states: remove train.optimizer, or set it "
                         "to galore_adamw / galore_adamw_8bit / galore_adafactor"))
    if a.type != "galore" and str(recipe.train.optimizer or "").startswith("galore"):
        problems.append(("train.optimizer", f"{recipe.train.optimizer} projects full-weight gradients; set "
                         "adapter.type: galore (its target modules and rank are adapter.galore_*)"))
    if a.type in SOFT_PROMPTS:
        if recipe.train.packing:
            problems.append(("train.packing", f"{a.type} prepends virtual tokens to every example, which packed rows "
                             "cannot take; set train.packing: false"))
        if recipe.speed.padding_free is True:
            problems.append(("speed.padding_free", f"{a.type} prepends virtual tokens to every row; padding-free "
                             "micro-batches have one row. Set speed.padding_free: false (auto turns it off)"))
    if a.type == "prefix_tuning" and recipe.train.gradient_checkpointing is True:
        problems.append(("train.gradient_checkpointing", "prefix_tuning hands its virtual keys/values to every layer "
                         "as the attention cache, and transformers drops the cache in a checkpointed layer (its "
                         "GradientCheckpointingLayer), so the first step fails; set train.gradient_checkpointing: "
                         "false (auto leaves it off)"))
    if a.type == "adalora" and adalora_steps(recipe, None) is None and spec.data not in ("conversations", "text"):
        problems.append(("adapter.total_step", "AdaLoRA's budget schedule needs the run's step count: set "
                         "train.max_steps (or adapter.total_step)"))
    return problems


def settle_adapter_defaults(recipe) -> None:
    """Defaults of other sections that an adapter type implies (called by Recipe.resolve_defaults): soft prompts turn
    speed.padding_free auto off (one flattened row cannot carry per-example virtual tokens); prefix tuning turns
    train.gradient_checkpointing auto off (its prefix travels as the attention cache, which checkpointed layers drop)."""
    if recipe.adapter.type in SOFT_PROMPTS and recipe.speed.padding_free == "auto":
        recipe.speed.padding_free = False
    if recipe.adapter.type == "prefix_tuning" and recipe.train.gradient_checkpointing == "auto":
        recipe.train.gradient_checkpointing = False
