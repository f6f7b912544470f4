"""Speed levers: the one place that decides how fast a run goes. Each lever is a `speed:` recipe key, on by default
where it is safe (`auto`), and each is checked on CPU to give the same losses and gradients as the plain path
(tests/test_speed.py); the GPU benchmark (bench/speed.py) records the same check and the gains.

  padding_free     sft/cpt micro-batches are one row of real tokens (no padding), with position ids that restart
                   at each example; attention never crosses an example boundary (varlen attention reads the
                   boundaries from the position ids; with sdpa transformers builds a block-diagonal mask). Real
                   instruction data is short and varied, so padding to the longest example wastes most of a batch.
  liger            Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) on CUDA, where liger-kernel is installed.
                   TRL already computes the loss through a chunked LM head that never materialises full logits.
  fused_optimizer  AdamW as one fused kernel per step (adamw_torch -> adamw_torch_fused) on CUDA.
  layout           speed.layout memory (default): checkpointing every layer, the accumulation micro-batches merged
                   into one where the memory plan fits the merged worst case (the host-side cost of a micro-batch,
                   ~0.3 s on the H100, is then paid once a step). speed.layout speed:
                   train.gradient_checkpointing: auto and speed.fold_accumulation: auto -> the memory plan
                   (memory.py), sized for the largest micro-batch the data can make, picks the fastest layout that
                   fits speed.memory_fraction of the GPU: accumulation micro-batches merged into one (same examples per
                   optimizer step; a small model's step is otherwise bound by Python and kernel-launch overhead),
                   then no checkpointing, then checkpointing every 2nd layer, then every layer.
  offload_checkpoints  with checkpointing under layout memory, the layer inputs kept for the recomputation wait
                   in pinned CPU memory, copied on a side stream (speed/offload.py).
  fused_lora       LoRA layers add scaling * (A x) B^T to the base output inside one addmm (speed/fused_lora.py)
                   instead of a multiply and an add over the whole output, and under autocast skip PEFT's fp32 copy
                   of the input; PEFT's forward for everything else. auto = plain LoRA; true = QLoRA's 4-bit too.
  keep_lora_dropout_mask  (off) LoRA's input dropout keeps its mask as bits, not the dropped-out 16-bit copy
                   (speed/lora_dropout.py; the same masks as PEFT's)
  recompute_lora_dropout  (off) LoRA's input dropout drawn again in the backward, not kept (speed/lora_dropout.py)
  max_micro_batch_tokens  (off) longer padding-free micro-batches trained as several (speed/split.py)
  fewer_syncs      (off until measured on a GPU; auto = on with CUDA) sft/cpt, one process: TRL's per-micro-batch
                   metrics, the Trainer's token count and NaN/inf loss filter kept on the device and read once per
                   log (speed/syncs.py): the host no longer waits for the GPU several times inside every step.
  trainer overhead the Trainer counts FLOPs by walking every parameter each micro-batch; counted once here.
  attention        auto = flash_attention_2 where flash-attn is installed on CUDA; else, for padding-free batches on
                   CUDA, varlen (speed/varlen.py: PyTorch's varlen flash kernel, example boundaries from the position
                   ids, no dense mask); else PyTorch sdpa.

`resolve(recipe, device, model_config)` turns every `auto` into a decision (written into the saved recipe, so
a run directory says what ran); `training_arguments` and `sft_arguments` hand the decisions to TrainingArguments
and SFTConfig; models.load_base_model takes speed.attention.
"""

from __future__ import annotations

import importlib.util

# Model types Liger patches (liger_kernel.transformers.monkey_patch); others train unpatched.
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
                     "phi3", "olmo2", "granite", "glm4"}


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve(recipe, device: str, model_config=None, gpu_memory_gib: float | None = None,
            lengths: list[int] | None = None) -> dict:
    """Decide every `auto` lever for this run and device; the decisions are written back into the recipe.
    `lengths` (token counts of the training examples) size the largest micro-batch for the memory plan.
    Returns {lever: decision} with the reason for each, for the run log."""
    from tuneforge.methods import method_spec

    s, reasons = recipe.speed, {}
    cuda = device == "cuda"
    takes_padding_free = bool(method_spec(recipe.method).hooks.get("padding_free"))  # the method's declaration
    if s.padding_free is True and not takes_padding_free:
        from tuneforge.errors import RecipeError

        raise RecipeError([f"`speed.padding_free`: method {recipe.method}'s trainer takes no padding-free micro-batches "
                           f"(only the SFT-style methods do); remove it or set it to auto"])
    if s.padding_free == "auto":
        s.padding_free = takes_padding_free and not recipe.train.packing
        reasons["padding_free"] = "the method takes it, no packing" if s.padding_free else (
            f"not used by {recipe.method}/packing")
    if s.max_micro_batch_tokens is not None:
        from tuneforge.mitigations import wanted as regularized
        from tuneforge.errors import RecipeError

        why = ("it splits sft/cpt micro-batches only" if recipe.method not in ("sft", "cpt") else
               "it splits padding-free micro-batches only (speed.padding_free is off here)" if s.padding_free is not True
               else "train.kl_to_base / train.ewc add their term to every micro-batch" if regularized(recipe) else None)
        if why:
            raise RecipeError([f"`speed.max_micro_batch_tokens`: {why}; remove the key"])
    model_type = getattr(model_config, "model_type", None)
    if s.liger == "auto":
        s.liger = cuda and liger_available() and model_type in LIGER_MODEL_TYPES and recipe.adapter.type != "qlora"
        reasons["liger"] = ("CUDA, liger-kernel installed, " + str(model_type)) if s.liger else (
            "needs CUDA, liger-kernel and a supported model type (not QLoRA)")
    if s.fused_optimizer == "auto":
        s.fused_optimizer = cuda and recipe.train.optimizer == "adamw_torch"
        reasons["fused_optimizer"] = "adamw_torch on CUDA" if s.fused_optimizer else "only for adamw_torch on CUDA"
    if s.fused_lora == "auto":
        # QLoRA's 4-bit layers take it when asked (fused_lora: true): not yet measured on a GPU
        s.fused_lora = recipe.adapter.type == "lora" and not recipe.adapter.use_dora
        reasons["fused_lora"] = "plain LoRA" if s.fused_lora else "auto: plain LoRA only (QLoRA: set true)"
    _check_dropout_levers(recipe)
    s.fewer_syncs, why = _fewer_syncs(recipe, cuda)
    if why:
        reasons["fewer_syncs"] = why
    if s.attention == "auto":
        from tuneforge.speed import varlen

        if cuda and flash_attention_available():
            s.attention = "flash_attention_2"
        elif s.padding_free and varlen.available(device):
            s.attention = "varlen"
        else:
            s.attention = "sdpa"
        reasons["attention"] = s.attention
    fold = 1
    if recipe.train.gradient_checkpointing == "auto" or s.fold_accumulation == "auto":
        fold, gc, why = choose_layout(recipe, device, model_config, gpu_memory_gib, lengths)
        if recipe.train.gradient_checkpointing == "auto":
            recipe.train.gradient_checkpointing = gc > 0
            s.checkpoint_every = gc or 1
        reasons["layout"] = why
    if s.offload_checkpoints == "auto":
        s.offload_checkpoints = cuda and s.layout == "memory" and recipe.train.gradient_checkpointing is True
        reasons["offload_checkpoints"] = ("checkpointed layer inputs wait in CPU memory" if s.offload_checkpoints else
                                          "only with gradient checkpointing under speed.layout memory on a GPU")
    if s.fold_accumulation == "auto":
        s.fold_accumulation = fold > 1
    elif s.fold_accumulation is True:  # asked for explicitly: all of a step's micro-batches in one
        fold = recipe.train.grad_accum
    if fold > 1:  # same examples per optimizer step; transformers normalises the loss by the step's tokens
        recipe.train.batch_size *= fold
        recipe.train.grad_accum //= fold
    return reasons


def _check_dropout_levers(recipe) -> None:
    """speed.recompute_lora_dropout / keep_lora_dropout_mask act inside the fused forward of plain LoRA layers."""
    from tuneforge.errors import RecipeError

    s = recipe.speed
    for key in ("recompute_lora_dropout", "keep_lora_dropout_mask"):
        if getattr(s, key) and s.fused_lora is not True:
            raise RecipeError([f"`speed.{key}`: it works inside the fused LoRA forward, which is off here "
                               "(speed.fused_lora); remove the key or turn speed.fused_lora on"])
        if getattr(s, key) and recipe.adapter.type != "lora":
            raise RecipeError([f"`speed.{key}`: plain LoRA only (adapter.type is {recipe.adapter.type}; QLoRA's 4-bit "
                               "layers keep their own copy of the input); remove the key"])
    if s.recompute_lora_dropout and s.keep_lora_dropout_mask:
        raise RecipeError(["`speed.keep_lora_dropout_mask` and `speed.recompute_lora_dropout`: choose one (the mask "
                           "kept as bits, or drawn again in the backward, nothing kept)"])


def _fewer_syncs(recipe, cuda: bool) -> tuple[bool, str | None]:
    """speed.fewer_syncs decided: (on, why) for auto; `true` where speed/syncs.py cannot act is refused."""
    from tuneforge.mitigations import wanted as regularized
    from tuneforge.ranks import world_size

    asked = recipe.speed.fewer_syncs
    if asked is False:
        return False, None
    blocker = ("it acts on TRL's SFTTrainer loss (sft/cpt only)" if recipe.method not in ("sft", "cpt") else
               "train.kl_to_base / train.ewc compute their own loss" if regularized(recipe) else
               f"{world_size()} processes gather their metrics every micro-batch" if world_size() > 1 else None)
    if asked is True:
        if blocker:
            from tuneforge.errors import RecipeError

            raise RecipeError([f"`speed.fewer_syncs`: {blocker}; remove the key or set it to auto"])
        return True, None
    on = cuda and blocker is None
    return on, ("metrics read once per log" if on else f"off ({blocker or 'only on CUDA: a CPU step never waits'})")


def resolve_for_run(recipe, console, lengths: list[int] | None = None):
    """The recipe with speed.* and train.gradient_checkpointing `auto` decided for this device: a new recipe (the one
    passed in is not changed), which the run saves so its recipe.yaml records what ran. `lengths` (the training
    examples' token counts) let the memory plan size the largest micro-batch the data can make."""
    from tuneforge.models import pick_device
    from tuneforge.ranks import local_rank

    device = pick_device()
    config, memory = None, None
    if device == "cuda":  # the memory plan needs the model's config and the GPU's memory
        import torch

        from tuneforge.memory import recipe_model_config
        from tuneforge.models import resolve_model_source

        try:
            config = recipe_model_config(recipe, resolve_source=resolve_model_source)
        except Exception:  # a config the plan cannot read: checkpointing stays on, Liger off (the safe choices)
            config = None
        memory = torch.cuda.get_device_properties(local_rank()).total_memory / 2**30
    recipe = recipe.model_copy(deep=True)
    reasons = resolve(recipe, device, config, memory, lengths=lengths)
    if reasons and device == "cuda":
        console.print("[bold]speed[/] " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    return recipe


def largest_micro_batch(recipe, lengths: list[int] | None, batch_size: int | None = None) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch the data can make: padding-free batches hold the real
    tokens of the batch_size longest examples at worst; padded ones batch_size x the longest example."""
    t = recipe.train
    batch_size = batch_size or t.batch_size
    if not lengths:
        return batch_size, t.max_length
    longest = sorted(lengths, reverse=True)[:batch_size]
    if recipe.speed.padding_free is True and not t.packing:
        cap = recipe.speed.max_micro_batch_tokens  # a longer micro-batch is split (speed/split.py)
        return 1, sum(longest) if cap is None else min(sum(longest), max(cap, longest[0]))
    return batch_size, (t.max_length if t.packing else longest[0])


SMALL_MODEL_PARAMETERS = 4e9


def _parameters(model_config) -> float:
    from tuneforge.memory import model_shape

    try:
        return float(model_shape(model_config).params_total)
    except Exception:
        return float("inf")


def _planned_gib(recipe, model_config, lengths, fold: int, gc: int) -> float:
    """Planned peak (GiB, memory.py) of the largest micro-batch the data can make with `fold` accumulation
    micro-batches merged, checkpointing none (gc 0), every 2nd layer (2) or every layer (1)."""
    from tuneforge.memory import plan_for_recipe

    rows, row_tokens = largest_micro_batch(recipe, lengths, recipe.train.batch_size * fold)
    # As this plan has always been made: bf16 and no modules_to_save, whatever the recipe says (kept so the layout
    # chosen stays the same; dropping these two pins would plan the recipe as guards and `tuneforge plan` do).
    settings = dict(seq_len=row_tokens, batch_size=rows, dtype="bf16", modules_to_save=())
    on = plan_for_recipe(recipe, model_config, gradient_checkpointing=True, **settings)["reserved_gib"]
    if gc == 1:
        return on
    off = plan_for_recipe(recipe, model_config, gradient_checkpointing=False, **settings)["reserved_gib"]
    return off if gc == 0 else on + (off - on) / 2  # every 2nd layer keeps half the activations


def choose_layout(recipe, device: str, model_config, gpu_memory_gib: float | None,
                  lengths: list[int] | None = None) -> tuple[int, int, str]:
    """(fold, checkpoint_every, why) for the largest micro-batch the data can make, checked against the memory plan
    in speed.memory_fraction of the GPU. fold = how many accumulation micro-batches are merged into one (same
    examples per optimizer step, same loss: a step's host-side cost -- Python, kernel launches, syncs, ~0.3 s per
    micro-batch on the H100 -- is paid once, not per micro-batch); checkpoint_every = 0 none, n = every n-th layer.

    layout memory: checkpoint every layer, micro-batches merged when the merged worst case fits the budget.
    layout speed: the fastest that fits, tried from merged without checkpointing down to every layer. CPU: (1, 0)."""
    t = recipe.train
    auto_gc = t.gradient_checkpointing == "auto"
    auto_fold = recipe.speed.fold_accumulation == "auto" and t.grad_accum > 1
    if device != "cuda":
        return 1, 0, "CPU: no checkpointing, micro-batches as written"
    budget = recipe.speed.memory_fraction * (gpu_memory_gib or 0)
    if recipe.speed.layout == "memory":
        gc = 1 if auto_gc or t.gradient_checkpointing else 0
        what = "checkpointing every layer" if gc else "no checkpointing (train.gradient_checkpointing: false)"
        if auto_fold and model_config is not None and gpu_memory_gib is not None:
            try:
                need = _planned_gib(recipe, model_config, lengths, t.grad_accum, gc)
            except Exception as exc:  # an architecture the plan does not know: micro-batches as written
                return 1, gc, f"speed.layout memory: {what}; memory plan unavailable ({exc}): micro-batches as written"
            if need <= budget:
                return t.grad_accum, gc, (f"speed.layout memory: {what}, the {t.grad_accum} accumulation micro-batches "
                                          f"merged into one: plan {need:.1f} GiB <= {budget:.1f} GiB budget for the "
                                          f"largest merged micro-batch")
            return 1, gc, (f"speed.layout memory: {what}, micro-batches as written (merged, the largest would need "
                           f"{need:.1f} GiB > {budget:.1f} GiB budget)")
        return 1, gc, f"speed.layout memory: {what}, micro-batches as written"
    if model_config is None or gpu_memory_gib is None:
        return 1, 1, "no memory plan for this model: checkpointing every layer, micro-batches as written"
    folds = [t.grad_accum, 1] if auto_fold else [1]
    gcs = [0, 2, 1] if auto_gc else [1 if t.gradient_checkpointing else 0]
    # A small model's step is bound by Python and kernel launches, not the GPU: one merged micro-batch, even with
    # recomputation, beats two without (measured, bench/results/*-speed-h100.md). A large one is bound by the GPU,
    # where recomputation costs a third more work: checkpointing is the last resort there.
    small = getattr(model_config, "num_hidden_layers", 0) and _parameters(model_config) < SMALL_MODEL_PARAMETERS
    layouts = [(f, g) for f in folds for g in gcs] if small else [(f, g) for g in gcs for f in folds]
    for fold, gc in layouts:
        try:
            need = _planned_gib(recipe, model_config, lengths, fold, gc)
        except Exception as exc:  # an architecture the plan does not know: the safe choice
            return 1, 1, f"memory plan unavailable ({exc}): checkpointing every layer"
        if need <= budget:
            rows, row_tokens = largest_micro_batch(recipe, lengths, t.batch_size * fold)
            what = {0: "no checkpointing", 2: "checkpointing every 2nd layer", 1: "checkpointing every layer"}[gc]
            return fold, gc, (f"{what}, micro-batch {t.batch_size * fold} x {t.grad_accum // fold} accumulation: "
                              f"plan {need:.1f} GiB <= {budget:.1f} GiB budget (largest micro-batch {rows} x "
                              f"{row_tokens} tokens)")
    return 1, gcs[-1] or 0, f"nothing fits the {budget:.1f} GiB budget by the plan; checkpointing as far as it goes"


def training_arguments(recipe, device: str) -> dict:
    """TrainingArguments fields for the resolved levers (every method)."""
    s, args = recipe.speed, {}
    if s.fused_optimizer is True and recipe.train.optimizer == "adamw_torch":
        args["optim"] = "adamw_torch_fused"
    if s.liger is True:
        args["use_liger_kernel"] = True
    if recipe.train.gradient_checkpointing is True and s.checkpoint_every > 1:
        args["activation_checkpointing_kwargs"] = {"every_n_layers": s.checkpoint_every, "use_reentrant": False}
    if s.compile:
        args["torch_compile"] = True
    return args


def sft_arguments(recipe) -> dict:
    """SFTConfig fields: padding-free batches. tuneforge's data is already truncated to train.max_length, so TRL's
    max_length (which it cannot enforce without packing in padding-free mode) is left unset."""
    if recipe.speed.padding_free is True and not recipe.train.packing:
        return {"padding_free": True, "max_length": None}
    return {}


def prepare_model(model, recipe) -> dict:
    """Levers that act on the built (adapter-wrapped) model before the Trainer sees it. Returns what was done."""
    done = {}
    if recipe.speed.fused_lora is True:
        from tuneforge.speed import fused_lora

        saves = ("recompute" if recipe.speed.recompute_lora_dropout else
                 "mask" if recipe.speed.keep_lora_dropout_mask else None)
        done["fused_lora_layers"] = fused_lora.install(model, dropout_saves=saves)
    return done


def prepare_trainer(trainer, recipe) -> None:
    """Levers that act on the built Trainer."""
    reduce_trainer_overhead(trainer)
    if recipe.speed.max_micro_batch_tokens is not None:
        from tuneforge.speed import split

        split.install(trainer, recipe.speed.max_micro_batch_tokens)
    if recipe.speed.offload_checkpoints is True and recipe.train.gradient_checkpointing is True:
        from tuneforge.speed import offload

        trainer.add_callback(offload.callback())
    if recipe.speed.fewer_syncs is True:  # last: its training_step wrapper sees the whole step's loss
        from tuneforge.speed import syncs

        syncs.install(trainer)


def reduce_trainer_overhead(trainer) -> None:
    """transformers' Trainer.floating_point_ops (for the logged total_flos) calls model.num_parameters() on every
    micro-batch, a walk over every parameter (~17 ms a micro-batch for a 1B model on the H100 host, measured with
    bench/profile_step.py). The count does not change during training: take it once, same formula."""
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return
    main_input = getattr(model, "main_input_name", "input_ids")
    parameters = model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(inputs) -> int:
        return 6 * inputs[main_input].numel() * parameters if main_input in inputs else 0

    trainer.floating_point_ops = floating_point_ops
