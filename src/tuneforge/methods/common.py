"""What methods share: the documented learning-rate ranges and refusals their declarations reuse, and recipe ->
the TrainingArguments fields every method shares (TRL configs subclass TrainingArguments)."""

from __future__ import annotations

from tuneforge.methods import Refusal

# Documented learning-rate ranges (outside them `doctor` warns): seed 000 step 3 table for supervised training; step 6
# for preference methods (far lower: 5e-7 full, up to ~5e-5 with LoRA); RL a decade below SFT (seed 000 step 7).
SUPERVISED_LR_RANGE = {"lora": (1e-5, 1e-3), "full": (1e-6, 1e-4)}
PREFERENCE_LR_RANGE = {"lora": (1e-7, 5e-5), "full": (1e-7, 5e-6)}
RL_LR_RANGE = {"lora": (1e-6, 5e-4), "full": (1e-7, 5e-5)}

# Methods that score whole sequences (pairs, rollouts) cannot pack several examples into one row.
NO_PACKING = Refusal("train.packing", lambda recipe: recipe.train.packing,
                     "this method scores whole sequences (pairs or rollouts); packing does not apply: set "
                     "train.packing: false")


# Methods trained on prompts alone have no held-out loss: nothing to evaluate every N steps or to stop early on (their
# held-out reward is scored before and after training).
NO_HELD_OUT_LOSS = (
    Refusal("train.eval_every", lambda recipe: bool(recipe.train.eval_every),
            "this method trains on prompts and has no held-out loss to evaluate every N steps (its held-out reward "
            "is scored before and after training); remove train.eval_every"),
    Refusal("train.early_stopping", lambda recipe: recipe.train.early_stopping is not None,
            "this method has no held-out loss to stop on; remove train.early_stopping"),
)


def rl_batch_divisible_by_group(recipe) -> list[tuple[str, str]]:
    """grpo/rloo sample rl.num_generations completions per prompt: the batch must hold whole groups."""
    batch = recipe.train.batch_size * recipe.train.grad_accum
    if batch % recipe.rl.num_generations:
        return [("rl.num_generations", f"{recipe.method} samples num_generations completions per prompt, so "
                                       f"train.batch_size x train.grad_accum ({batch}) must be a multiple of it "
                                       f"(got {recipe.rl.num_generations})")]
    return []


def needs_a_reward(recipe) -> list[tuple[str, str]]:
    if not recipe.rl.rewards and not recipe.rl.reward_model:
        return [("rl.rewards", f"method {recipe.method} needs at least one reward: e.g. rl.rewards: [{{name: "
                               f"exact_answer}}], or rl.reward_model (a reward run directory)")]
    return []


def precision_flags(recipe, device: str) -> dict:
    """auto: bf16 on a GPU that has it (seed 000 "forgetting bf16" mistake), fp32 on CPU."""
    import torch

    choice = recipe.train.precision
    if choice == "auto":
        choice = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def warmup_fields(warmup: float) -> dict:
    """train.warmup < 1 is a fraction of the steps, else a number of steps."""
    return {"warmup_steps": warmup if warmup < 1 else int(warmup)}


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(recipe) -> list[str]:
    """The trackers train.report_to names; one that is not installed is a recipe error naming the key (train.py
    calls this before the run directory exists, so the error leaves nothing behind)."""
    import importlib.util

    from tuneforge.errors import RecipeError

    wanted = list(dict.fromkeys(recipe.train.report_to))
    missing = [name for name in wanted if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
    if missing:
        raise RecipeError([f"`train.report_to`: {', '.join(missing)} not installed; pip install {' '.join(missing)}, "
                           f"or remove {'it' if len(missing) == 1 else 'them'} from train.report_to"])
    return wanted


def tracker_arguments(recipe, run) -> dict:
    """train.report_to -> report_to/run_name, TensorBoard left out: the run adds its own callback writing into
    <run>/tensorboard (`tensorboard_callback`). A tracker that is not installed is a recipe error naming the key, not
    an ImportError halfway through setting up the trainer."""
    wanted = [name for name in check_trackers(recipe) if name != "tensorboard"]
    return {"report_to": wanted or "none", "run_name": recipe.name}


def tensorboard_callback(recipe, run):
    """transformers' TensorBoard callback writing into <run>/tensorboard, or None without `tensorboard` in
    train.report_to. transformers takes the folder only from the TENSORBOARD_LOGGING_DIR environment variable (else
    the events land under checkpoints/); setting the callback's folder here changes no process-wide state."""
    if "tensorboard" not in recipe.train.report_to:
        return None
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(run.file("tensorboard"))
    return callback


def common_arguments(recipe, run, device: str) -> dict:
    from tuneforge.library_fixes import checkpointing_field

    t = recipe.train
    has_eval = bool(t.eval_every)
    args = dict(
        output_dir=str(run.file("checkpoints")),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        # Eval uses the training micro-batch: a larger default eval batch is how runs that trained fine OOM at eval.
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        lr_scheduler_type=t.scheduler,
        **warmup_fields(t.warmup),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        **checkpointing_field(t.gradient_checkpointing is True),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        **tracker_arguments(recipe, run),
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=True,
        # data.order (a curriculum): the examples arrive sorted (data/pipeline.py) and are read in that order
        **({} if recipe.data.order == "shuffle" else {"train_sampling_strategy": "sequential"}),
        **precision_flags(recipe, device),
    )
    from tuneforge import speed
    from tuneforge.distributed import training_arguments

    args.update(speed.training_arguments(recipe, device))  # fused optimizer, Liger, selective checkpointing, compile
    args.update(training_arguments(recipe, device))  # recipe.distributed under accelerate launch; {} otherwise
    return args


def adapter_folder(value: str):
    """model.adapter -> the adapter folder: the folder itself, or a tuneforge run directory's adapter/."""
    from pathlib import Path

    from tuneforge.errors import RecipeError

    path = Path(value)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if (path / "model" / "config.json").is_file():
        raise RecipeError([f"`model.adapter`: {value} is a full fine-tuning run (model/, no adapter); start from it "
                           f"with model.name: {path / 'model'} instead"])
    raise RecipeError([f"`model.adapter`: {value} holds no LoRA adapter (no adapter_config.json there or in adapter/)"])


def load_start_adapter(model, recipe, console=None):
    """recipe.model.adapter -> (model, wrapped). continue: the saved adapter, trainable (seed 000 step 12: DPO keeps
    updating the SFT adapter), wrapped=True so no fresh adapter is added. merge: the adapter merged into the base
    weights, wrapped=False so recipe.adapter then adds a fresh one (or full fine-tuning trains the merged model)."""
    if not recipe.model.adapter:
        return model, False
    from peft import PeftModel, prepare_model_for_kbit_training

    folder = adapter_folder(recipe.model.adapter)
    if recipe.model.adapter_mode == "continue":
        if recipe.adapter.type == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing is True)
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        if console is not None:
            console.print(f"[bold]adapter[/] continuing {folder} (trainable)")
        return model, True
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    if console is not None:
        console.print(f"[bold]adapter[/] merged {folder} into the base weights; training a fresh adapter on top")
    return model, False
