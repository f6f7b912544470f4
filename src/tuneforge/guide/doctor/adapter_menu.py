"""Checks of the adapter types beyond LoRA (adapter_kinds.py): each knob against its documented range and the
model. Learning rates are checked by schedule.check_learning_rate against the method's range scaled for the type
(methods.Method.lr_range_for). Ranges and their sources:

- soft prompts: 8-200 virtual tokens (the prefix-tuning paper's 10-200; PEFT's examples 8-30); prompt tuning on a
  model under ~1B parameters trails LoRA by a wide margin (Lester et al. 2021: it matches fine-tuning only near 10B
  parameters; seed 003: "underperforms LoRA for most tasks");
- AdaLoRA: target_r below init_r (the budget it prunes to; paper: 8 of 12), tinit + tfinal well inside the run;
- GaLore: a rank below the targeted layers' smaller side (128-512 in the paper for 1B-7B models);
- LISA: fewer active layers than the model has (the paper: 2 of 32), an interval shorter than the run;
- Spectrum: a share below 1 (25% or 50% in the paper); freeze: layers the model has;
- bottleneck: a width of at least 1 (hidden / reduction).
"""

from __future__ import annotations

from tuneforge.guide.doctor.core import Context, Finding

SOFT = ("prompt_tuning", "prefix_tuning", "p_tuning")


def _layers(ctx: Context) -> int | None:
    config = getattr(ctx.model_config, "text_config", None) or ctx.model_config
    return getattr(config, "num_hidden_layers", None)


def _hidden(ctx: Context) -> int | None:
    config = getattr(ctx.model_config, "text_config", None) or ctx.model_config
    return getattr(config, "hidden_size", None)


def check_adapter_menu(ctx: Context):
    a = ctx.recipe.adapter
    steps = ctx.recipe.train.max_steps
    if a.type in SOFT:
        if a.num_virtual_tokens > 200 or a.num_virtual_tokens < 4:
            yield Finding("warning", "virtual-tokens-range", f"adapter.num_virtual_tokens = {a.num_virtual_tokens}",
                          "soft prompts are documented with 8-200 virtual tokens (prefix-tuning paper: 10-200); more "
                          "take context and compute from every example, fewer have little to learn with",
                          "use 8-100 (20 is PEFT's example)", ctx.where("adapter.num_virtual_tokens"))
        if a.type == "prompt_tuning" and ctx.model_config is not None:
            from tuneforge.memory import count_parameters

            try:
                params = count_parameters(ctx.model_config)["total"]
            except Exception:
                params = None
            if params and params < 1e9:
                yield Finding("info", "prompt-tuning-small-model",
                              f"prompt tuning on a {params / 1e6:.0f}M-parameter model",
                              "prompt tuning matches fine-tuning only near 10B parameters (Lester et al. 2021); on "
                              "small models it trails LoRA (seed 003)", "compare it with lora: tuneforge compare "
                              "RECIPE --methods lora,prompt_tuning", ctx.where("adapter.type"))
    if a.type == "adalora" and steps and a.tinit + a.tfinal > 0.8 * steps:
        yield Finding("warning", "adalora-schedule", f"AdaLoRA's tinit + tfinal = {a.tinit + a.tfinal} of "
                      f"{steps} steps", "the budget is pruned only between tinit and total_step - tfinal",
                      "leave most of the run to the pruning phase (the paper: tinit ~10%, tfinal ~20-30%)",
                      ctx.where("adapter.tinit"))
    layers, hidden = _layers(ctx), _hidden(ctx)
    if a.type == "galore" and hidden and a.galore_rank >= hidden:
        yield Finding("warning", "galore-rank", f"adapter.galore_rank = {a.galore_rank} is not below the hidden "
                      f"size {hidden}", "a projection as wide as the layer saves no optimizer memory",
                      f"use a rank well below {hidden} (128-512 in the GaLore paper)", ctx.where("adapter.galore_rank"))
    if a.type == "lisa" and layers and a.lisa_layers >= layers:
        yield Finding("warning", "lisa-all-layers", f"adapter.lisa_layers = {a.lisa_layers} of the model's {layers}",
                      "with every layer active LISA is full fine-tuning", "use 1-4 layers (the paper: 2)",
                      ctx.where("adapter.lisa_layers"))
    if a.type == "lisa" and steps and a.lisa_interval >= steps:
        yield Finding("warning", "lisa-interval", f"adapter.lisa_interval = {a.lisa_interval} >= the run's {steps} "
                      "steps", "only one random set of layers ever trains", "use an interval well below the run "
                      "(LMFlow: 20)", ctx.where("adapter.lisa_interval"))
    if a.type == "spectrum" and a.spectrum_top_fraction >= 1:
        yield Finding("warning", "spectrum-all", "adapter.spectrum_top_fraction = 1: every layer trains",
                      "Spectrum at 100% is full fine-tuning", "use 0.25 or 0.5 (the paper)",
                      ctx.where("adapter.spectrum_top_fraction"))
    if a.type == "freeze" and layers:
        wanted = [a.trainable_layers] if isinstance(a.trainable_layers, int) else a.trainable_layers
        too_many = isinstance(a.trainable_layers, int) and a.trainable_layers > layers
        outside = [] if isinstance(a.trainable_layers, int) else [i for i in wanted if not -layers <= i < layers]
        if too_many or outside:
            yield Finding("error", "freeze-layers", f"adapter.trainable_layers {a.trainable_layers} on a model of "
                          f"{layers} layers", "those layers do not exist",
                          f"name layers 0..{layers - 1} (or -1..-{layers}), or at most {layers} last layers",
                          ctx.where("adapter.trainable_layers"))
    if a.type == "bottleneck" and hidden and hidden // a.bottleneck_reduction < 1:
        yield Finding("error", "bottleneck-width", f"hidden size {hidden} / adapter.bottleneck_reduction "
                      f"{a.bottleneck_reduction} is below 1", "the adapter would have no width",
                      "use a reduction of 8-64 (AdapterHub: 16)", ctx.where("adapter.bottleneck_reduction"))
