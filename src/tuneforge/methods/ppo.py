"""method: ppo -- classic RLHF stage 3 (seed 000 step 7; seed 001 part 8): the policy samples completions for the
data's prompts, a trained reward model scores them, and PPO (clipped surrogate + a clipped value loss, GAE) updates
the policy, with a per-token KL penalty to the frozen reference paid inside the reward (seed 000: "the KL enters
via the reward, not the advantage").

Four models, as the seeds describe:
  policy      the model being trained: LoRA (adapter.*, so it fits one GPU) or full
  reference   the policy as it starts, frozen: with a fresh LoRA adapter the adapter disabled (no copy in memory);
              with a continued adapter (model.adapter) or full fine-tuning, a frozen copy
  reward      rl.reward_model: a `method: reward` run (sequence-classification head, one output), frozen
  value       a sequence-classification model with one output, initialised from the reward model (its backbone
              already reads these answers; TRL's own examples do the same) and trained beside the policy

Recipe keys: rl.reward_model (required), rl.kl_coef (0.05), rl.clip_range (0.2), rl.value_clip (0.2), rl.vf_coef,
rl.gamma (1.0), rl.lam (0.95), rl.ppo_epochs (4), rl.num_mini_batches (4), rl.kl_estimator, rl.whiten_rewards,
rl.missing_eos_penalty, rl.temperature, rl.max_new_tokens; train.batch_size x train.grad_accum prompts are rolled
out per PPO update; train.max_steps counts PPO updates (else train.epochs passes over the prompts).
Logged each update (metrics.jsonl, plotted in the report): objective/scores (mean reward-model score),
objective/kl, objective/entropy, objective/rlhf_reward, loss/policy_avg, loss/value_avg, policy/clipfrac_avg, ...

The trainer is TRL's PPOTrainer, where the installed TRL has it. TRL 1.1x removed it (TRL PR 7020) and tuneforge
does not carry a copy of another project's trainer, so with TRL 1.16 `method: ppo` stops before the run starts with
an error that says what to use instead (`ppo_classes`). Refused: resume (PPO's own loop writes no resumable
checkpoints), a reward model whose vocabulary differs from the policy's.
"""

from __future__ import annotations

from tuneforge.errors import RecipeError
from tuneforge.methods import register
from tuneforge.methods.common import common_arguments


def ppo_classes():
    """(PPOConfig, PPOTrainer) from the installed TRL, or a RecipeError on `method` saying what to do instead."""
    for module in ("trl.experimental.ppo", "trl"):
        try:
            imported = __import__(module, fromlist=["PPOConfig", "PPOTrainer"])
            return imported.PPOConfig, imported.PPOTrainer
        except (ImportError, AttributeError):
            continue
    import trl

    raise RecipeError([f"`method`: ppo needs TRL's PPOTrainer, which TRL {trl.__version__} no longer ships (removed in "
                       f"TRL 1.1x); tuneforge does not carry a copy of it. Use method: grpo or rloo with rl.rewards: "
                       f"[{{name: reward_model, options: {{path: <your reward run>}}}}] (on-policy RL against the same "
                       f"reward model, on trainers TRL ships), or install a TRL that still has PPOTrainer"])


def value_model_from(reward_model):
    """A trainable copy of the reward model: the value network V(s) (a scalar head on every position)."""
    import copy

    value = copy.deepcopy(reward_model)
    value.train()
    for parameter in value.parameters():
        parameter.requires_grad_(True)
    return value


def build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, run, device, callbacks):
    from tuneforge.methods.reward import load_reward_model
    PPOConfig, PPOTrainer = ppo_classes()

    rl = recipe.rl
    reward_model, reward_tokenizer = load_reward_model(rl.reward_model, device=device)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RecipeError([f"`rl.reward_model`: {rl.reward_model} uses a different tokenizer from the policy "
                           f"({recipe.model.name}); PPO scores the policy's token ids directly, so train the reward "
                           f"model from the same base model"])
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    value_model = value_model_from(reward_model)
    common = common_arguments(recipe, run, device)
    steps = common.pop("max_steps")
    batch = recipe.train.batch_size * recipe.train.grad_accum
    for key in ("include_num_input_tokens_seen", "eval_strategy", "eval_steps"):
        common.pop(key, None)
    args = PPOConfig(
        **common,
        total_episodes=steps * batch if steps and steps > 0 else None,
        num_ppo_epochs=rl.ppo_epochs, num_mini_batches=rl.num_mini_batches, kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator, cliprange=rl.clip_range, cliprange_value=rl.value_clip, vf_coef=rl.vf_coef,
        gamma=rl.gamma, lam=rl.lam, whiten_rewards=rl.whiten_rewards, missing_eos_penalty=rl.missing_eos_penalty,
        temperature=rl.temperature, response_length=rl.max_new_tokens, stop_token="eos",
        local_rollout_forward_batch_size=max(1, recipe.train.batch_size), num_sample_generations=0,
        eval_strategy="no",
    )
    ref_model = None
    continued = bool(recipe.model.adapter) and recipe.model.adapter_mode == "continue"
    if not recipe.uses_lora or continued:
        from tuneforge.methods.preference import reference_copy

        ref_model = reference_copy(model)
    tokenizer.padding_side = "left"  # prompts are left-padded so every completion starts at the same column
    # PPO stops completions at processing_class.eos_token_id: make that the chat template's end-of-turn token
    from tuneforge.data.template import end_of_turn_token_id

    end = end_of_turn_token_id(tokenizer)
    if end is not None and end != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=model, ref_model=ref_model,
                         reward_model=reward_model, value_model=value_model, train_dataset=train_dataset,
                         eval_dataset=eval_dataset if eval_dataset is not None else train_dataset, callbacks=callbacks)
    trainer.policy_for_eval = model
    return trainer


register("ppo")(build_trainer)
