"""method: reward -- a reward model on TRL's RewardTrainer: the base model with a sequence-classification head that
outputs one scalar (num_labels=1), trained on preference pairs (the same data formats as DPO: data/preference.py)
with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) (seed 001 part 8, stage 2; seed 003).

Recipe keys read: train.* (lr default 1e-4 LoRA / 1e-5 full), adapter.* (LoRA on the backbone, the `score` head
trained fully beside it), preference.max_prompt_length, rl.eval_prompts (held-out pairs scored), model.adapter
(an SFT adapter is merged into the backbone first: a reward model is a new head, not a continued policy).
Refused: packing (recipe), quantised 4-bit training of the head (qlora is allowed: the head stays in full precision).

Output: adapter/ (LoRA + the score head) or model/ (full), usable as
  * PPO's reward:  rl.reward_model: runs/<this run>
  * a GRPO/RLOO/online DPO reward: rl.rewards: [{name: reward_model, options: {path: runs/<this run>}}]
  * a judge in Python: load_reward_model(path) + score_texts(model, tokenizer, texts)
Held-out pairwise accuracy (r(chosen) > r(rejected)) before and after training goes to eval/reward.json.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.methods import Method, register
from tuneforge.methods.common import NO_PACKING, SUPERVISED_LR_RANGE, common_arguments


def load_reward_base(recipe, device: str, console=None):
    """The base model with a fresh one-output score head (seed 000 step 7: num_labels=1, not a causal LM head)."""
    from tuneforge.models import load_with_score_head

    model = load_with_score_head(recipe, device, num_labels=1, fix="use a decoder model that transformers can load "
                                 "as AutoModelForSequenceClassification (Llama, Qwen, SmolLM, ...)")
    if recipe.model.adapter:
        from peft import PeftModel

        from tuneforge.methods.common import adapter_folder

        folder = adapter_folder(recipe.model.adapter)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        if console is not None:
            console.print(f"[bold]adapter[/] merged {folder} into the reward model's backbone")
    if device != "cpu" and recipe.adapter.type != "qlora":
        model.to(device)
    return model


def apply_reward_adapter(model, recipe, gradient_checkpointing: bool = False):
    """LoRA on the backbone as adapter.* says; the new score head is trained fully (PEFT SEQ_CLS modules_to_save)."""
    from tuneforge.adapters import apply_adapter, check_target_modules, lora_config

    if not recipe.uses_lora:
        return apply_adapter(model, recipe)
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, recipe.adapter.target_modules)
    if recipe.adapter.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = lora_config(recipe.adapter)
    config.task_type = "SEQ_CLS"
    config.ensure_weight_tying = False  # the head is not tied to anything
    return get_peft_model(model, config)


def reward_pair_dataset(pairs):
    """Pre-tokenized rows for RewardTrainer: chosen_ids / rejected_ids = prompt + answer, templated like DPO's."""
    from datasets import Dataset

    return Dataset.from_dict({"chosen_ids": [p.prompt_ids + p.chosen_ids for p in pairs],
                              "rejected_ids": [p.prompt_ids + p.rejected_ids for p in pairs]})


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    from trl import RewardConfig, RewardTrainer

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**common_arguments(recipe, run, device), max_length=recipe.train.max_length,
                        disable_dropout=True, dataset_num_proc=None)
    return RewardTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, callbacks=callbacks)


# Learning rate: TRL's reward-model default 1e-5 for full fine-tuning, LoRA 10x.
register(Method(
    name="reward", family="reward", data="pairs", summary="a reward model (one-output head) trained on pairs",
    lr={"lora": 1e-4, "full": 1e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING,), seeds="seed 000 step 7", hooks={"scores": "pairwise"}))


# ---------------------------------------------------------------------------------------------------------------
# Scoring with a reward model: held-out accuracy, and the saved model as a judge / PPO's reward


def score_ids(model, sequences: list[list[int]], pad_id: int, *, batch_size: int = 8) -> list[float]:
    """The scalar score of each token sequence (right-padded; the head reads the last non-pad token)."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out += logits[:, 0].float().tolist()
    model.train(was_training)
    return out


def pairwise_accuracy(model, tokenizer, pairs, *, batch_size: int = 8) -> dict:
    """Held-out pairs: % where r(prompt + chosen) > r(prompt + rejected), and the mean margin."""
    if not pairs:
        return {"n": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [seq for p in pairs for seq in (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)]
    scores = score_ids(model, rows, pad, batch_size=batch_size)
    margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(pairs))]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"n": len(pairs), "accuracy": round(100 * wins / len(pairs), 1),
            "mean_margin": round(sum(margins) / len(margins), 4),
            "mean_chosen": round(sum(scores[0::2]) / len(pairs), 4),
            "mean_rejected": round(sum(scores[1::2]) / len(pairs), 4)}


def load_reward_model(path: str, *, device: str | None = None, where: str = "rl.reward_model",
                      trust_remote_code: bool = False):
    """A trained reward model -> (model, tokenizer), merged and frozen. `path`: a `method: reward` run directory
    (its adapter/ or model/), or a sequence-classification model folder with one output. `trust_remote_code` comes
    from the caller (the user's own recipe), never from the reward run's saved recipe."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models import load_tokenizer, pick_device, quiet_transformers

    quiet_transformers()
    device = device or pick_device()
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"reward model {path} not found", where=where,
                         fix="train one with method: reward (recipes/reward.yaml) and give its run directory")
    if (folder / "recipe.yaml").exists():
        from tuneforge.recipe import load_recipe

        recipe = load_recipe(folder / "recipe.yaml")
        from tuneforge.models import check_run_trust

        check_run_trust(folder, recipe, trust_remote_code)
        if recipe.method != "reward":
            raise ModelError(f"{path} is a `method: {recipe.method}` run, not a reward model", where=where,
                             fix="point it at the run directory of a `method: reward` run")
        if (folder / "adapter" / "adapter_config.json").is_file():
            from peft import PeftModel

            base_recipe = recipe.model_copy(deep=True)
            base_recipe.model.trust_remote_code = trust_remote_code
            if base_recipe.adapter.type == "qlora":  # a judge is loaded unquantised, the adapter merged into it
                base_recipe.adapter.type = "lora"
            base = load_reward_base(base_recipe, "cpu")
            model = PeftModel.from_pretrained(base, str(folder / "adapter")).merge_and_unload()
            tokenizer = load_tokenizer(str(folder / "adapter"))
        elif (folder / "model" / "config.json").is_file():
            model = AutoModelForSequenceClassification.from_pretrained(str(folder / "model"), num_labels=1)
            tokenizer = load_tokenizer(str(folder / "model"))
        else:
            raise ModelError(f"run {path} has no saved weights (adapter/ or model/); did it finish?", where=where)
    elif (folder / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
        tokenizer = load_tokenizer(str(folder))
    else:
        raise ModelError(f"{path} is neither a reward run directory nor a model folder (no recipe.yaml or config.json)",
                         where=where, fix="give the run directory of a `method: reward` run")
    if getattr(model.config, "num_labels", 1) != 1:
        raise ModelError(f"{path} has {model.config.num_labels} outputs; a reward model has exactly one", where=where)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def score_texts(model, tokenizer, texts: list[str], *, batch_size: int = 8) -> list[float]:
    """The reward model as a judge: one score per (already templated) text, higher = preferred."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] or [pad] for t in texts]
    return score_ids(model, sequences, pad, batch_size=batch_size)
