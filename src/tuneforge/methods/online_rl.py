"""Online RL with reward functions on TRL: grpo (GRPOTrainer), rloo (RLOOTrainer), online_dpo (experimental
OnlineDPOTrainer). Each samples completions for the data's prompts, scores them with `rl.rewards` (rewards.py:
verifiable rewards, a reward model, custom functions; summed with their weights) and updates the policy.

  grpo        samples rl.num_generations completions per prompt and uses each one's reward relative to its group
              (no value network; seed 001 part 10): group size rl.num_generations, KL beta rl.kl_coef (default 0.04),
              clipping rl.clip_range, rl.temperature / rl.top_p / rl.max_new_tokens, rl.num_iterations,
              rl.scale_rewards, rl.loss_type.
  rloo        REINFORCE leave-one-out: the baseline of a completion is the mean reward of the others in its group;
              same keys (KL beta default 0.05).
  online_dpo  two completions per prompt, the rewards pick chosen/rejected, DPO loss on the pair (beta rl.kl_coef,
              default 0.1; rl.loss_type sigmoid | ipo).

Reference model: the policy as it starts. With a fresh LoRA adapter that is the adapter disabled (no second model);
with a continued adapter (model.adapter) or full fine-tuning, a frozen copy. Generation: transformers generate,
vLLM (colocated) when rl.use_vllm is on and vllm is installed.
Refused: rl.use_vllm without vllm installed; a batch that is not a multiple of the group (recipe check).
"""

from __future__ import annotations

from tuneforge.errors import RecipeError
from tuneforge.methods import Method, register
from tuneforge.methods.common import (NO_HELD_OUT_LOSS, NO_PACKING, PREFERENCE_LR_RANGE, RL_LR_RANGE, common_arguments, needs_a_reward,
                                      rl_batch_divisible_by_group)


def vllm_fields(recipe) -> dict:
    if not recipe.rl.use_vllm:
        return {"use_vllm": False}
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(["`rl.use_vllm`: vllm is not installed here; pip install vllm (Linux + CUDA GPU), or set "
                           "rl.use_vllm: false to generate with transformers"])
    return {"use_vllm": True, "vllm_mode": "colocate"}


def recipe_rewards(recipe, device):
    """The Reward objects of rl.rewards (the run builds them once, before its run directory exists, into ctx.rewards;
    this is for a trainer built outside a run)."""
    from tuneforge.rewards import build_rewards

    return build_rewards(recipe.rl.rewards, base_dir=recipe.source_dir, device=device,
                         reward_model_path=recipe.rl.reward_model, trust_remote_code=recipe.model.trust_remote_code)


def _continued(recipe) -> bool:
    return bool(recipe.model.adapter) and recipe.model.adapter_mode == "continue"


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    rl, method = recipe.rl, recipe.method
    rewards = ctx.rewards if ctx.rewards is not None else recipe_rewards(recipe, device)
    functions, weights = [r.function for r in rewards], [r.weight for r in rewards]
    common = common_arguments(recipe, run, device)
    common["remove_unused_columns"] = False  # the rewards read the data's other columns
    # held-out scoring is done by the run (scores.py) (greedy completions + rewards, before and after); TRL's own eval would
    # sample num_generations per prompt at every eval
    common.update(eval_strategy="no", eval_steps=None)
    generation = dict(temperature=rl.temperature, top_p=rl.top_p, **vllm_fields(recipe))
    if method in ("grpo", "rloo"):
        shared = dict(num_generations=rl.num_generations, max_completion_length=rl.max_new_tokens, beta=rl.kl_coef,
                      epsilon=rl.clip_range, num_iterations=rl.num_iterations, reward_weights=weights, **generation)
        if method == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            extra = {"loss_type": rl.loss_type} if rl.loss_type else {}
            args = GRPOConfig(**common, **shared, scale_rewards=rl.scale_rewards, **extra)
            trainer_class = GRPOTrainer
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**common, **shared)
            trainer_class = RLOOTrainer
        return trainer_class(model=model, reward_funcs=functions, args=args, train_dataset=train_dataset,
                             processing_class=tokenizer, callbacks=callbacks)
    if method == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        extra = {"loss_type": rl.loss_type} if rl.loss_type else {}
        args = OnlineDPOConfig(**common, beta=[rl.kl_coef], max_new_tokens=rl.max_new_tokens,
                               max_length=recipe.train.max_length, missing_eos_penalty=rl.missing_eos_penalty,
                               reward_weights=weights, **generation, **extra)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=functions, args=args, train_dataset=train_dataset,
                                   processing_class=tokenizer, callbacks=callbacks)
        if recipe.uses_lora and not _continued(recipe):
            trainer.ref_model = None  # a fresh adapter: the reference is the adapter disabled, not a deep copy
        return trainer
    raise RecipeError([f"`method`: {method} is not an online RL method"])


def _grouped(recipe) -> list[tuple[str, str]]:
    return needs_a_reward(recipe) + rl_batch_divisible_by_group(recipe)


# Learning rates: TRL's (GRPO/RLOO 1e-6 full, online DPO 5e-7 as DPO), LoRA 10x. KL coefficient: GRPO 0.04 (the GRPO
# paper), RLOO 0.05 (TRL), online DPO 0.1 (DPO's beta, seed 000 step 6). Seed 003: too small a KL and the policy
# hacks the reward, too large and RL makes no progress.
register(Method(
    name="grpo", family="rl", data="prompts", summary="RL with reward functions, advantages relative to a group",
    lr={"lora": 1e-5, "full": 1e-6}, lr_range=RL_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING, *NO_HELD_OUT_LOSS), check=_grouped, kl=0.04, seeds="seed 001 part 10", hooks={"scores": "rewards"}))
register(Method(
    name="rloo", family="rl", data="prompts", summary="REINFORCE leave-one-out with reward functions",
    lr={"lora": 1e-5, "full": 1e-6}, lr_range=RL_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING, *NO_HELD_OUT_LOSS), check=_grouped, kl=0.05, seeds="seed 001 part 10", hooks={"scores": "rewards"}))
register(Method(
    name="online_dpo", family="rl", data="prompts", summary="DPO on pairs sampled online and ranked by the rewards",
    lr={"lora": 5e-6, "full": 5e-7}, lr_range=PREFERENCE_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING, *NO_HELD_OUT_LOSS), check=needs_a_reward, kl=0.1, seeds="seed 000 step 6", hooks={"scores": "rewards"}))
