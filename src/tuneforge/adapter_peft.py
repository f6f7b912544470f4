"""The PEFT adapter types beside LoRA: AdaLoRA, IA3 and the soft prompts (prompt tuning, prefix tuning / P-tuning v2,
P-tuning), each a PEFT config built from `adapter.*` (recipe_adapter.py), plus what AdaLoRA needs during training.

All of them save `adapter/` through PEFT's save_pretrained, so `PeftModel.from_pretrained(base, run/adapter)` loads
them back with nothing from tuneforge. Soft prompts live in the input (virtual tokens), so they cannot be merged
into the weights: `tuneforge merge` refuses them and generate/eval/chat run them as a PeftModel.

AdaLoRA reallocates its rank budget during training by importance: PEFT asks the training loop to call
`update_and_allocate(step)` after the optimizer step and before the gradients are zeroed, which the Trainer's
on_optimizer_step callback is. The importance estimates (exponential moving averages in PEFT's RankAllocator) are
training state the adapter weights do not hold, so they are written into every checkpoint and read back on resume
(`keep_state_in_checkpoints`), or a resumed run would prune differently from an uninterrupted one.
"""

from __future__ import annotations

from tuneforge.adapter_kinds import SOFT_PROMPTS


def _targets(adapter, peft_default):
    """target_modules as PEFT takes them; IA3 left at all-linear means PEFT's per-model default list."""
    if peft_default and adapter.target_modules == "all-linear":
        return None
    return adapter.target_modules


def peft_config(adapter, model_config=None):
    """The PEFT config of an AdaLoRA / IA3 / soft-prompt adapter (LoRA's is adapters.lora_config)."""
    kind = adapter.type
    if kind == "adalora":
        from peft import AdaLoraConfig

        if not adapter.total_step:
            from tuneforge.errors import RecipeError

            raise RecipeError(["`adapter.total_step`: AdaLoRA's budget schedule needs the run's step count; set "
                               "train.max_steps or adapter.total_step"])
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=adapter.init_r, target_r=adapter.target_r,
                             tinit=adapter.tinit, tfinal=adapter.tfinal, deltaT=adapter.deltaT,
                             total_step=adapter.total_step, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                             target_modules=adapter.target_modules, bias=adapter.bias,
                             modules_to_save=adapter.modules_to_save or None)
    if kind == "ia3":
        from peft import IA3Config

        return IA3Config(task_type="CAUSAL_LM", target_modules=_targets(adapter, True),
                         feedforward_modules=adapter.feedforward_modules,
                         modules_to_save=adapter.modules_to_save or None)
    if kind == "prompt_tuning":
        from peft import PromptTuningConfig

        # Initialised from text after the model is wrapped (init_from_text): PEFT's own TEXT init reloads the
        # tokenizer by name, which the embedded model and local folders do not always have.
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens)
    if kind == "prefix_tuning":
        from peft import PrefixTuningConfig

        hidden = adapter.encoder_hidden_size or getattr(model_config, "hidden_size", None) or 768
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens,
                                  prefix_projection=adapter.prefix_projection, encoder_hidden_size=hidden,
                                  init_weights="zero" if adapter.prefix_init == "zero" else None)
    if kind == "p_tuning":
        from peft import PromptEncoderConfig

        hidden = adapter.encoder_hidden_size or getattr(model_config, "hidden_size", None) or 768
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens,
                                   encoder_hidden_size=hidden,
                                   encoder_reparameterization_type=adapter.encoder_reparameterization_type)
    raise ValueError(f"no PEFT config for adapter.type {kind}")


def init_from_text(peft_model, tokenizer, text: str, num_virtual_tokens: int) -> None:
    """Prompt tuning from text, as PEFT's TEXT init does: the text's token embeddings, repeated or cut to the number
    of virtual tokens (the prompt-tuning paper's "class label / vocabulary" init beats random)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        from tuneforge.errors import RecipeError

        raise RecipeError([f"`adapter.prompt_init_text`: {text!r} has no tokens; give a phrase describing the task"])
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    embeddings = peft_model.get_input_embeddings()
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    with torch.no_grad():
        values = embeddings(torch.tensor(ids, device=embeddings.weight.device)).detach()
        encoder.embedding.weight.copy_(values.to(encoder.embedding.weight.dtype))


def apply_peft_type(model, adapter, tokenizer=None):
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(adapter, getattr(model, "config", None)))
    if adapter.type == "prompt_tuning" and adapter.prompt_init_text:
        if tokenizer is None:
            raise ValueError("prompt_init_text needs the tokenizer")
        init_from_text(peft_model, tokenizer, adapter.prompt_init_text, adapter.num_virtual_tokens)
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# During training


def adalora_callback():
    """A TrainerCallback that runs AdaLoRA's budget step after each optimizer step (gradients still present) and
    makes the schedule's length the Trainer's own step count."""
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            inner = _adalora_model(model)
            if inner is not None and state.max_steps > 0:
                config = inner.peft_config[inner.trainable_adapter_name]
                if config.total_step != state.max_steps and config.tinit + config.tfinal < state.max_steps:
                    config.total_step = state.max_steps

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            inner = _adalora_model(model)
            if inner is not None:
                inner.update_and_allocate(state.global_step)

    return AdaLoraBudget()


def _adalora_model(model):
    base = getattr(model, "base_model", None)
    return base if base is not None and hasattr(base, "update_and_allocate") else None


def adalora_state(model) -> dict:
    inner = _adalora_model(model)
    allocator = inner.rankallocator
    config = inner.peft_config[inner.trainable_adapter_name]
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": config.rank_pattern, "total_step": config.total_step}


def load_adalora_state(model, state: dict) -> None:
    inner = _adalora_model(model)
    allocator = inner.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    config = inner.peft_config[inner.trainable_adapter_name]
    config.rank_pattern, config.total_step = state["rank_pattern"], state["total_step"]


def keep_state_in_checkpoints(trainer, name: str, get_state, set_state) -> None:
    """Training state beside the weights and optimizer (AdaLoRA's importance, LISA's layer choice) written into each
    checkpoint folder with the RNG state (so it is inside the atomic save: checkpoints.py) and read back when the
    Trainer restores the RNG state on resume. `get_state()` -> a dict of tensors/plain values; `set_state(dict)`."""
    import os

    import torch

    save_rng, load_rng = trainer._save_rng_state, trainer._load_rng_state

    def save(output_dir, *args, **kwargs):
        save_rng(output_dir, *args, **kwargs)
        if trainer.args.should_save:
            torch.save(get_state(), os.path.join(output_dir, f"{name}.pt"))

    def load(checkpoint, *args, **kwargs):
        load_rng(checkpoint, *args, **kwargs)
        path = os.path.join(checkpoint, f"{name}.pt") if checkpoint else None
        if path and os.path.exists(path):
            set_state(torch.load(path, weights_only=True))

    trainer._save_rng_state, trainer._load_rng_state = save, load


def unpruned_checkpoints(trainer, model) -> None:
    """AdaLoRA checkpoints hold the full init_r matrices. PEFT saves an AdaLoRA adapter cut to its rank pattern
    (right for the final adapter/), but the model that resumes from a checkpoint is built at init_r, so a pruned
    checkpoint would not load back; the pattern itself travels in adalora_state.pt."""
    save_checkpoint, save = trainer._save_checkpoint, trainer._save
    inside = {"checkpoint": False}

    def save_checkpoint_unpruned(*args, **kwargs):
        inside["checkpoint"] = True
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            inside["checkpoint"] = False

    def save_weights(*args, **kwargs):
        inner = _adalora_model(model)
        if not inside["checkpoint"] or inner is None:
            return save(*args, **kwargs)
        config = inner.peft_config[inner.trainable_adapter_name]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            return save(*args, **kwargs)
        finally:
            config.rank_pattern = pattern

    trainer._save_checkpoint, trainer._save = save_checkpoint_unpruned, save_weights


def encoder_checkpoints(trainer, model) -> None:
    """Soft prompts resume from the whole prompt encoder. PEFT saves a soft prompt as the virtual tokens it computes
    (for prefix_projection / P-tuning: the MLP's output, the MLP dropped: right for the final adapter/, which
    loads for inference), which a trainable model cannot load back (prefix_projection: another shape) or would
    load wrongly (P-tuning: the MLP applied twice). Checkpoints carry the encoder's own weights and resume loads
    those."""
    import os

    import torch

    encoder = model.prompt_encoder[model.active_adapter]
    keep_state_in_checkpoints(trainer, "prompt_encoder",
                              lambda: {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
                              lambda state: encoder.load_state_dict(state))
    original = trainer._load_from_checkpoint

    def load_from_checkpoint(resume_from_checkpoint, *args, **kwargs):
        path = os.path.join(resume_from_checkpoint, "prompt_encoder.pt")
        if not os.path.exists(path):
            return original(resume_from_checkpoint, *args, **kwargs)
        state = torch.load(path, weights_only=True)
        encoder.load_state_dict({k: v.to(encoder.state_dict()[k].dtype) for k, v in state.items()})

    trainer._load_from_checkpoint = load_from_checkpoint


def install_peft_hooks(trainer, adapter) -> None:
    if adapter.type in SOFT_PROMPTS:
        encoder_checkpoints(trainer, trainer.model)
    if adapter.type == "adalora":
        model = trainer.model
        trainer.add_callback(adalora_callback())
        unpruned_checkpoints(trainer, model)
        keep_state_in_checkpoints(trainer, "adalora_state", lambda: adalora_state(model),
                                  lambda state: load_adalora_state(model, state))


def is_soft_prompt(adapter_type: str) -> bool:
    return adapter_type in SOFT_PROMPTS
