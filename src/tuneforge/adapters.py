"""recipe.adapter -> the adapter, applied to a loaded model: LoRA (DoRA, rsLoRA, PiSSA/OLoRA init, bias), QLoRA here;
AdaLoRA, IA3 and the soft prompts in adapter_peft.py; the bottleneck adapter in bottleneck.py; the full-parameter
memory savers (GaLore, LISA, Spectrum, freeze) in full_savers.py. adapter_kinds.py is the table of types.

Target modules are checked against the model before anything trains: a name that matches no module is an
error that lists the linear modules the model has (the "LoRA target modules that match nothing" bug).
"""

from __future__ import annotations

from tuneforge.errors import RecipeError


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers a LoRA can target (the output head excluded)."""
    import torch

    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full_name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full_name.split(".")[-1])
    return sorted(names)


def check_target_modules(model, target_modules) -> None:
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):  # PEFT reads a single string as a regex over full module paths
        import re

        if not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
            raise RecipeError([
                f"`adapter.target_modules`: the pattern {target_modules!r} matches no module path of this model "
                f"(a single string is a regex over full paths like model.layers.0.self_attn.q_proj; for names use a "
                f"list, e.g. [q_proj, v_proj]); its linear layers are {linear_module_names(model)}"
            ])
        return
    targets = list(target_modules)
    existing = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in existing]
    if missing:
        raise RecipeError([
            f"`adapter.target_modules`: {missing} match no module of this model; its linear layers are "
            f"{linear_module_names(model)} (or use all-linear)"
        ])


def lora_config(adapter):
    from peft import LoraConfig

    init = {"default": True, "pissa": "pissa", "olora": "olora"}[adapter.init]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        bias=adapter.bias,
        target_modules=adapter.target_modules,
        modules_to_save=adapter.modules_to_save or None,
        use_dora=adapter.use_dora,
        use_rslora=adapter.use_rslora,
        init_lora_weights=init,
        # With tied input/output embeddings, a trained copy of one must stay tied to the other (PEFT issue 2777).
        ensure_weight_tying=bool(adapter.modules_to_save),
    )


def apply_adapter(model, recipe, *, gradient_checkpointing: bool = False, tokenizer=None):
    """Wrap the model for training as the recipe says. Full fine-tuning returns the model with all weights trainable;
    the full-parameter savers return it with the weights they train trainable (full_savers.py)."""
    from tuneforge.adapter_kinds import FULL_SAVERS, LORA_TYPES

    adapter = recipe.adapter
    if adapter.type in ("full", "none", *FULL_SAVERS):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if adapter.type in FULL_SAVERS:
            from tuneforge.full_savers import apply_full_saver

            apply_full_saver(model, recipe)
        return model
    if adapter.type == "bottleneck":
        from tuneforge.bottleneck import add_bottlenecks

        return add_bottlenecks(model, adapter)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if adapter.type in (*LORA_TYPES, "adalora") or adapter.target_modules != "all-linear":
        check_target_modules(model, adapter.target_modules)
    if adapter.quantized:
        # Freezes the 4-bit base and casts norms to fp32 for stable training (seed 000 step 5).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapter.type in LORA_TYPES:
        return get_peft_model(model, lora_config(adapter))
    from tuneforge.adapter_peft import apply_peft_type

    return apply_peft_type(model, adapter, tokenizer)


def install_adapter_hooks(trainer, recipe) -> None:
    """What an adapter type needs from the training loop (AdaLoRA's budget step, soft prompts' encoder in
    checkpoints, LISA's layer switches, GaLore's optimizer targets), installed on the built trainer before train()."""
    from tuneforge.adapter_kinds import FULL_SAVERS

    if recipe.adapter.type in ("adalora", "prompt_tuning", "prefix_tuning", "p_tuning"):
        from tuneforge.adapter_peft import install_peft_hooks

        install_peft_hooks(trainer, recipe.adapter)
    elif recipe.adapter.type in FULL_SAVERS:
        from tuneforge.full_savers import install_saver_hooks

        install_saver_hooks(trainer, recipe)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted at their real element count."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if type(parameter).__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def describe_trainable(model) -> str:
    """The line PEFT's print_trainable_parameters shows (seed 000 step 4)."""
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(1, total):.4f}"
