"""method: ppo -- classic RLHF stage 3 (seed 000 step 7; seed 001 part 8): the policy samples completions for the
data's prompts, a trained reward model scores them, and PPO (clipped surrogate + a clipped value loss, GAE) updates
the policy, with a per-token KL penalty to the frozen reference paid inside the reward (seed 000: "the KL enters
via the reward, not the advantage").

Four models, as the seeds describe:
  policy      the model being trained: LoRA (adapter.*, so it fits one GPU), QLoRA or full
  reference   the policy as it starts, frozen: with a fresh LoRA adapter the adapter disabled (no copy in memory);
              with a continued adapter (model.adapter) or full fine-tuning, a frozen copy
  reward      rl.reward_model: a `method: reward` run (sequence-classification head, one output), frozen
  value       a sequence-classification model with one output, initialised from the reward model (its backbone
              already reads these answers) and trained beside the policy

Why tuneforge has its own loop: TRL 1.1x removed PPOTrainer (TRL PR 7020) and no library we stand on ships PPO for
causal LMs any more. The loop below is written from the algorithm (Schulman et al. 2017; Ouyang et al. 2022's
per-token KL in the reward) on transformers.Trainer's machinery -- its optimizer and scheduler (train.optimizer,
train.scheduler), callbacks (progress bar, metrics.jsonl, trackers, Ctrl-C), logging and saving -- so only the
rollout and the PPO update are ours. One update (a global step):
  1. rollout   train.batch_size x train.grad_accum prompts; the policy samples (rl.temperature, rl.max_new_tokens),
               each answer ends at the chat template's end-of-turn token
  2. score     reward model on prompt + answer (its score at the answer's last token; rl.missing_eos_penalty is
               subtracted when the answer never ended); per-token reward = -kl_coef * KL(policy || reference), the
               score added at the last token (KL by rl.kl_estimator k1 or k3)
  3. advantage values from the value model, GAE (rl.gamma, rl.lam), advantages whitened (rewards too with
               rl.whiten_rewards)
  4. update    rl.ppo_epochs passes over the rollouts in rl.num_mini_batches mini-batches (micro-batches of
               train.batch_size accumulated inside one): clipped ratio loss (rl.clip_range) + rl.vf_coef x clipped
               value loss (rl.value_clip), one optimizer over the policy's trainable weights and the value model
Dropout is off in every model (the ratio must compare the same function). train.max_steps counts updates (else
train.epochs passes over the prompts). Logged each update (metrics.jsonl, plotted in the report): objective/scores,
objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward, loss/policy_avg, loss/value_avg,
policy/clipfrac_avg, policy/approxkl_avg, val/ratio, val/num_eos_tokens, loss (policy + vf_coef x value).
Refused: resume (the loop writes no resumable checkpoints), several processes, a reward model whose vocabulary
differs from the policy's.
"""

from __future__ import annotations

import contextlib
import math

from tuneforge.errors import RecipeError
from tuneforge.methods import Method, Refusal, register
from tuneforge.methods.common import NO_HELD_OUT_LOSS, NO_PACKING, RL_LR_RANGE, common_arguments


# ---------------------------------------------------------------------------------------------------------------
# The pieces of one update, each a plain function of tensors (tests/test_rl.py checks them by hand)


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked entries; with shift_mean False the mean is added back (rewards keep sign)."""
    import torch

    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_per_token(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(policy || reference) estimate from sampled tokens: k1 = log p - log q; k3 = (r - 1) - log r with
    r = q / p (non-negative, lower variance)."""
    import torch

    log_ratio = logprobs - ref_logprobs
    return log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over the answer tokens -> (advantages, returns). Positions past the answer
    (mask 0) neither receive nor pass on value."""
    import torch

    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, *, clip_range: float,
               value_clip: float):
    """-> (policy loss, value loss, clip fraction, approx KL): PPO's clipped surrogate and the clipped value loss."""
    import torch

    ratio = torch.exp(new_logprobs - old_logprobs)
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_loss = masked_mean(surrogate, mask)
    clipped_values = old_values + (new_values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    approx_kl = 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask)
    return policy_loss, value_loss, clipfrac, approx_kl


# ---------------------------------------------------------------------------------------------------------------
# Model helpers


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def answer_logprobs(model, ids, mask, prompt_width: int, temperature: float):
    """Log-probs (and entropies) of the answer tokens ids[:, prompt_width:] under a causal LM."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    logits = logits[:, prompt_width - 1:-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, ids[:, prompt_width:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def score_head(model):
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise RecipeError([f"`rl.reward_model`: {type(model).__name__} has no `score` head; PPO needs a "
                           f"sequence-classification model with one output (a `method: reward` run)"])
    return head


def token_scores(model, ids, mask):
    """The sequence-classification head applied at every position: [batch, length] scalars."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def value_model_from(reward_model):
    """A trainable copy of the reward model: the value network V(s) (its scalar head read at every position)."""
    import copy

    value = copy.deepcopy(reward_model)
    for parameter in value.parameters():
        parameter.requires_grad_(True)
    return value


# ---------------------------------------------------------------------------------------------------------------
# The trainer


def ppo_trainer_class():
    import torch
    from transformers import GenerationConfig, Trainer

    class PolicyAndValue(torch.nn.Module):
        """One module so that one optimizer (train.optimizer) steps the policy's trainable weights and the value
        model; the run reads `.policy` for evaluation and saving."""

        def __init__(self, policy, value):
            super().__init__()
            self.policy, self.value = policy, value

    class PPOLoop(Trainer):
        def __init__(self, *, recipe, policy, value_model, reward_model, ref_model, tokenizer, stop_ids, **kwargs):
            super().__init__(model=PolicyAndValue(policy, value_model), processing_class=tokenizer, **kwargs)
            self.recipe, self.rl = recipe, recipe.rl
            self.policy, self.value_model, self.reward_model, self.ref_model = policy, value_model, reward_model, ref_model
            self.stop_ids = stop_ids
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
            self.policy_for_eval = policy

        # -- rollout ---------------------------------------------------------------------------------------------
        def batches(self):
            """Endless shuffled prompt batches of batch_size x grad_accum (epoch after epoch)."""
            generator = torch.Generator().manual_seed(self.args.seed)
            rows = self.train_dataset["input_ids"]
            size = self.recipe.train.batch_size * self.recipe.train.grad_accum
            while True:
                order = torch.randperm(len(rows), generator=generator).tolist()
                for start in range(0, len(order) - size + 1, size):
                    yield [rows[i] for i in order[start:start + size]]

        def left_pad(self, prompts):
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            return ids.to(self.args.device), mask.to(self.args.device)

        @torch.no_grad()
        def rollout(self, prompts) -> dict:
            ids, mask = self.left_pad(prompts)
            width = ids.shape[1]
            config = GenerationConfig(do_sample=True, temperature=self.rl.temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=self.rl.max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_id)
            sequences = self.policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            answer = sequences[:, width:]
            is_stop = torch.isin(answer, torch.tensor(self.stop_ids, device=answer.device))
            ended = is_stop.any(dim=1)
            first_stop = torch.where(ended, is_stop.int().argmax(dim=1), torch.full_like(ended, answer.shape[1], dtype=torch.long))
            index = torch.arange(answer.shape[1], device=answer.device).unsqueeze(0)
            answer_mask = (index <= first_stop.unsqueeze(1)).long()  # the stop token is part of the answer
            answer = torch.where(answer_mask.bool(), answer, torch.full_like(answer, self.pad_id))
            ids = torch.cat([ids, answer], dim=1)
            full_mask = torch.cat([mask, answer_mask], dim=1)
            logprobs, entropy = self.forward_in_chunks(lambda i, m: answer_logprobs(self.policy, i, m, width, self.rl.temperature), ids, full_mask)
            ref = self.ref_model or self.policy
            with (self.policy.disable_adapter() if self.ref_model is None else contextlib.nullcontext()):
                ref_logprobs, _ = self.forward_in_chunks(lambda i, m: answer_logprobs(ref, i, m, width, self.rl.temperature), ids, full_mask)
            values = self.forward_in_chunks(lambda i, m: (token_scores(self.value_model, i, m)[:, width - 1:-1],), ids, full_mask)[0]
            last = width + answer_mask.sum(dim=1) - 1
            reward_scores = self.forward_in_chunks(lambda i, m: (token_scores(self.reward_model, i, m),), ids, full_mask)[0]
            scores = reward_scores.gather(1, last.unsqueeze(1)).squeeze(1)
            if self.rl.missing_eos_penalty is not None:
                scores = scores - self.rl.missing_eos_penalty * (~ended).float()
            answer_mask = answer_mask.float()
            kl = kl_per_token(logprobs, ref_logprobs, self.rl.kl_estimator) * answer_mask
            non_score = -self.rl.kl_coef * kl
            rewards = non_score.clone()
            rewards[torch.arange(len(rewards)), last - width] += scores
            if self.rl.whiten_rewards:
                rewards = masked_whiten(rewards, answer_mask, shift_mean=False)
            values = values * answer_mask
            advantages, returns = gae(rewards, values, answer_mask, self.rl.gamma, self.rl.lam)
            advantages = masked_whiten(advantages, answer_mask)
            return dict(ids=ids, mask=full_mask, width=width, answer_mask=answer_mask, logprobs=logprobs, values=values,
                        advantages=advantages, returns=returns, scores=scores, kl=kl, non_score=non_score,
                        entropy=entropy, ended=ended)

        def forward_in_chunks(self, fn, ids, mask):
            """fn over micro-batches of train.batch_size (the rollout batch may be larger than what fits)."""
            step = self.recipe.train.batch_size
            parts = [fn(ids[s:s + step], mask[s:s + step]) for s in range(0, len(ids), step)]
            return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))

        # -- update ----------------------------------------------------------------------------------------------
        def update(self, batch) -> dict:
            size = len(batch["ids"])
            mini = size // self.rl.num_mini_batches
            micro = max(1, min(self.recipe.train.batch_size, mini))
            stats = {"policy": [], "value": [], "clipfrac": [], "approxkl": [], "ratio": []}
            generator = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
            for _ in range(self.rl.ppo_epochs):
                order = torch.randperm(size, generator=generator)
                for start in range(0, size, mini):
                    chosen = order[start:start + mini]
                    for micro_start in range(0, len(chosen), micro):
                        rows = chosen[micro_start:micro_start + micro]
                        width = batch["width"]
                        with self.autocast_smart_context_manager():
                            new_logprobs, _ = answer_logprobs(self.policy, batch["ids"][rows], batch["mask"][rows],
                                                              width, self.rl.temperature)
                            new_values = token_scores(self.value_model, batch["ids"][rows],
                                                      batch["mask"][rows])[:, width - 1:-1]
                        m = batch["answer_mask"][rows]
                        policy_loss, value_loss, clipfrac, approx_kl = ppo_losses(
                            new_logprobs, batch["logprobs"][rows], batch["advantages"][rows], new_values,
                            batch["values"][rows], batch["returns"][rows], m, clip_range=self.rl.clip_range,
                            value_clip=self.rl.value_clip)
                        loss = (policy_loss + self.rl.vf_coef * value_loss) * len(rows) / len(chosen)
                        loss.backward()
                        stats["policy"].append(policy_loss.item())
                        stats["value"].append(value_loss.item())
                        stats["clipfrac"].append(clipfrac.item())
                        stats["approxkl"].append(approx_kl.item())
                        stats["ratio"].append(masked_mean(torch.exp(new_logprobs - batch["logprobs"][rows]), m).item())
                    self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
                    if self.args.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                       self.args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            return {key: sum(v) / len(v) for key, v in stats.items()}

        def train(self, *args, **kwargs):
            rl, t = self.rl, self.recipe.train
            rollout_size = t.batch_size * t.grad_accum
            per_epoch = max(1, len(self.train_dataset) // rollout_size)
            updates = t.max_steps if t.max_steps and t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
            self.create_optimizer_and_scheduler(num_training_steps=updates * rl.ppo_epochs * rl.num_mini_batches)
            self.state.max_steps, self.state.global_step, self.state.epoch = updates, 0, 0.0
            self.state.num_input_tokens_seen = 0
            self.state.logging_steps = t.logging_steps
            for model in (self.policy, self.value_model, self.reward_model, self.ref_model):
                if model is not None:
                    model.eval()  # no dropout; the update still takes gradients
            self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
            prompts = self.batches()
            for update in range(updates):
                self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
                batch = self.rollout(next(prompts))
                losses = self.update(batch)
                self.state.global_step = update + 1
                self.state.epoch = self.state.global_step / per_epoch
                self.state.num_input_tokens_seen += int(batch["mask"].sum())
                eos_count = int(batch["ended"].sum())
                kl_sum = batch["kl"].sum(1)
                non_score = batch["non_score"].sum(1)
                logs = {
                    "loss": losses["policy"] + rl.vf_coef * losses["value"],
                    "objective/scores": batch["scores"].mean().item(),
                    "objective/kl": kl_sum.mean().item(),
                    "objective/entropy": masked_mean(batch["entropy"], batch["answer_mask"]).item(),
                    "objective/non_score_reward": non_score.mean().item(),
                    "objective/rlhf_reward": (batch["scores"] + non_score).mean().item(),
                    "loss/policy_avg": losses["policy"], "loss/value_avg": losses["value"],
                    "policy/clipfrac_avg": losses["clipfrac"], "policy/approxkl_avg": losses["approxkl"],
                    "val/ratio": losses["ratio"], "val/num_eos_tokens": eos_count,
                    "val/answer_length": batch["answer_mask"].sum(1).mean().item(),
                    "learning_rate": self.lr_scheduler.get_last_lr()[0],
                }
                self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
                self.log(logs)
                if self.control.should_training_stop:
                    break
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)

        def save_model(self, output_dir=None, _internal_call=False):
            self.policy.save_pretrained(output_dir or self.args.output_dir)

        def evaluate(self, *args, **kwargs):  # held-out rewards are scored by the run after training
            return {}

    return PPOLoop


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    from transformers import TrainingArguments

    from tuneforge.ranks import world_size
    from tuneforge.methods.reward import load_reward_model

    if world_size() > 1:
        raise RecipeError(["`method`: ppo runs in one process (its rollout loop is not distributed); launch it without "
                           "--gpus, or use method: grpo / rloo (TRL's trainers) for several GPUs"])
    rl = recipe.rl
    reward_model, reward_tokenizer = load_reward_model(rl.reward_model, device=device,
                                                       trust_remote_code=recipe.model.trust_remote_code)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RecipeError([f"`rl.reward_model`: {rl.reward_model} uses a different tokenizer from the policy "
                           f"({recipe.model.name}); PPO scores the policy's token ids directly, so train the reward "
                           f"model from the same base model"])
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    for parameter in reward_model.parameters():
        parameter.requires_grad_(False)
    value_model = value_model_from(reward_model)
    common = common_arguments(recipe, run, device)
    for key in ("include_num_input_tokens_seen", "eval_strategy", "eval_steps", "save_strategy", "save_steps"):
        common.pop(key, None)
    args = TrainingArguments(**common, eval_strategy="no", save_strategy="no")
    ref_model = None
    continued = bool(recipe.model.adapter) and recipe.model.adapter_mode == "continue"
    if not recipe.uses_lora or continued:
        from tuneforge.methods.preference import reference_copy

        ref_model = reference_copy(model)
    from tuneforge.data.template import end_of_turn_token_id

    stop_ids = model.generation_config.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    end = end_of_turn_token_id(tokenizer)
    if end is not None and end not in stop_ids:
        stop_ids.append(end)
    if not stop_ids:
        raise RecipeError(["`model.name`: the tokenizer names no end-of-turn or EOS token, so answers could not end"])
    return ppo_trainer_class()(recipe=recipe, policy=model, value_model=value_model, reward_model=reward_model,
                               ref_model=ref_model, tokenizer=tokenizer, stop_ids=stop_ids, args=args,
                               train_dataset=train_dataset, callbacks=callbacks)


def _ppo_needs(recipe) -> list[tuple[str, str]]:
    rl, problems = recipe.rl, []
    if not rl.reward_model:
        problems.append(("rl.reward_model", "method ppo optimises a trained reward model: train one with method: "
                                            "reward, then set rl.reward_model to its run directory"))
    batch = recipe.train.batch_size * recipe.train.grad_accum
    if batch % rl.num_mini_batches:
        problems.append(("rl.num_mini_batches", f"ppo splits each batch of rollouts (train.batch_size x grad_accum = "
                                                f"{batch}) into num_mini_batches; it must divide it (got "
                                                f"{rl.num_mini_batches})"))
    return problems


# Learning rate: seed 000 step 7 (PPO 1e-5 full), LoRA 10x; KL coefficient 0.05 (seed 000 step 7).
register(Method(
    name="ppo", family="rl", data="prompts", summary="RLHF against a trained reward model (clipped PPO, GAE)",
    lr={"lora": 1e-4, "full": 1e-5}, lr_range=RL_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING,
             Refusal("rl.use_vllm", lambda recipe: recipe.rl.use_vllm,
                     "ppo samples its rollouts with transformers generate (tuneforge's PPO loop has no vLLM path); set "
                     "rl.use_vllm: false, or use grpo / rloo / online_dpo, which generate with vLLM"),
             Refusal("train.save_every", lambda recipe: bool(recipe.train.save_every),
                     "ppo's loop writes no resumable checkpoints (it cannot resume); remove train.save_every"),
             *NO_HELD_OUT_LOSS),
    check=_ppo_needs, kl=0.05, resumable=False, seeds="seed 000 step 7; seed 001 part 8", hooks={"scores": "rewards"}))
