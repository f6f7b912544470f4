"""method: rft -- rejection-sampling fine-tuning (seed 000 step 13, beside GRPO; STaR / ReST / RAFT): rounds of

    sample   rft.samples_per_prompt answers per training prompt from the current model (temperature, top_p)
    score    each answer with rl.rewards (rewards.py, exactly as grpo scores its rollouts: the weighted sum)
    keep     best: each prompt's highest-reward answer that passes (total reward >= rft.threshold) |
             passing: every distinct passing answer
    SFT      on the kept answers (prompt masked, loss on the answer: TRL's SFTTrainer, methods/sft.py), the model
             carrying over from round to round (a fresh optimizer and schedule each round)

then the held-out prompts are answered greedily and scored by the same rewards. Each round's acceptance rate (passing
answers / sampled answers), kept answers, SFT steps and held-out reward go to summary.json `rft.rounds`,
eval/rft_rounds.json and report.html; the held-out reward before the first round is the run's usual "before"
(eval/rewards.json), the last round's is its "after".

Recipe keys: rft.rounds, samples_per_prompt, keep, threshold, temperature, top_p, prompts_per_round; rl.rewards
(required) and rl.reward_model, rl.max_new_tokens (sampling and scoring), rl.eval_prompts, rl.max_prompt_length; train.*
as for SFT, per round (train.max_steps or train.epochs over that round's kept answers).
Refused: rl keys of the policy-gradient methods (num_generations, temperature, kl_coef, ...: rft has its own or none),
packing, train.eval_every / early_stopping (no held-out loss: the rounds' held-out reward is the measure), and
train.save_every and --resume (each round resamples from the model, so a run restarts rather than resumes).
"""

from __future__ import annotations

from tuneforge.methods import Method, Refusal, register
from tuneforge.methods.common import NO_HELD_OUT_LOSS, NO_PACKING, SUPERVISED_LR_RANGE, needs_a_reward

# rl.* keys rft reads; every other rl key belongs to the policy-gradient methods
RL_KEYS_READ = ("rewards", "reward_model", "max_new_tokens", "eval_prompts", "max_prompt_length")
RL_KEY_INSTEAD = {"num_generations": "rft.samples_per_prompt", "temperature": "rft.temperature", "top_p": "rft.top_p"}


def sample_answers(model, tokenizer, prompts: list[str], *, samples: int, temperature: float, top_p: float,
                   max_new_tokens: int, batch_size: int = 16) -> list[list[str]]:
    """`samples` sampled answers for each already-templated prompt (left padding, the prompt's end kept when it is
    longer than the context allows)."""
    import torch

    from tuneforge.evaluate.generation import context_limit, encode_prompts

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    limit = context_limit(model, tokenizer, max_new_tokens)
    per_batch = max(1, batch_size // samples)
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), per_batch):
            ids, _ = encode_prompts(tokenizer, prompts[start:start + per_batch], limit)
            encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                output = model.generate(**encoded, do_sample=True, temperature=temperature, top_p=top_p,
                                        num_return_sequences=samples, max_new_tokens=max_new_tokens, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=model.generation_config.eos_token_id)
            texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i * samples:(i + 1) * samples] for i in range(len(ids))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def select(totals: list[list[float]], answers: list[list[str]], *, keep: str, threshold: float) -> list[tuple[int, str]]:
    """(prompt index, answer) kept: the best passing answer of each prompt, or every distinct passing one."""
    kept = []
    for i, (scores, texts) in enumerate(zip(totals, answers)):
        passing = [(s, t) for s, t in zip(scores, texts) if s >= threshold]
        if not passing:
            continue
        if keep == "best":
            kept.append((i, max(passing, key=lambda pair: pair[0])[1]))  # the first of equals
        else:
            seen = set()
            for _, text in passing:
                if " ".join(text.split()) not in seen:
                    seen.add(" ".join(text.split()))
                    kept.append((i, text))
    return kept


def answer_example(tokenizer, example: dict, answer: str, max_length: int):
    """A kept answer as an SFT example: loss on the answer (and its end-of-turn) only."""
    from tuneforge.data.template import tokenize_example, tokenize_prompt_completion

    if tokenizer.chat_template:
        return tokenize_example(tokenizer, {"messages": example["prompt"] + [{"role": "assistant", "content": answer}],
                                            "completion_turns": 1, "where": example["where"]}, max_length)
    return tokenize_prompt_completion(tokenizer, example["prompt_text"], answer, max_length, example["where"])


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    import random

    import torch
    from trl import SFTTrainer

    from tuneforge.data.pipeline import to_dataset
    from tuneforge.evaluate.held_out_rewards import describe_rewards, held_out_scorer
    from tuneforge.methods.online_rl import recipe_rewards
    from tuneforge.methods.sft import build_trainer as sft_trainer
    from tuneforge.rewards import score_all

    recipe, tokenizer, console, data = ctx.recipe, ctx.tokenizer, ctx.console, ctx.data
    rft = recipe.rft
    rewards = ctx.rewards if ctx.rewards is not None else recipe_rewards(recipe, ctx.device)
    held_out = held_out_scorer(recipe, data, ctx.device, rewards)
    chat = bool(tokenizer.chat_template)
    max_length = recipe.train.max_length

    class RFTTrainer(SFTTrainer):
        """SFTTrainer whose train() runs the rounds; steps are numbered across rounds in metrics.jsonl."""

        _offset, _round, final_held_out = 0, 0, None

        def log(self, logs, *args, **kwargs):
            self.state.global_step += self._offset
            try:
                return super().log({**logs, "rft_round": self._round}, *args, **kwargs)
            finally:
                self.state.global_step -= self._offset

        def train(self, resume_from_checkpoint=None, **kwargs):
            rng = random.Random(recipe.train.seed)
            rounds, total, result = [], 0, None
            for number in range(1, rft.rounds + 1):
                examples = list(data.train)
                if rft.prompts_per_round and rft.prompts_per_round < len(examples):
                    examples = rng.sample(examples, rft.prompts_per_round)
                torch.manual_seed(recipe.train.seed + number)
                answers = sample_answers(self.model, tokenizer, [e["prompt_text"] for e in examples],
                                         samples=rft.samples_per_prompt, temperature=rft.temperature, top_p=rft.top_p,
                                         max_new_tokens=recipe.rl.max_new_tokens, batch_size=recipe.eval.batch_size)
                flat = [(e, t) for e, texts in zip(examples, answers) for t in texts]
                columns = {name: [e["columns"].get(name) for e, _ in flat] for name in data.columns}
                scored = score_all(rewards, [e["prompt"] if chat else e["prompt_text"] for e, _ in flat],
                                   [[{"role": "assistant", "content": t}] if chat else t for _, t in flat], columns)
                n = rft.samples_per_prompt
                totals = [scored["total"][i * n:(i + 1) * n] for i in range(len(examples))]
                kept = select(totals, answers, keep=rft.keep, threshold=rft.threshold)
                passing = sum(s >= rft.threshold for s in scored["total"])
                row = {"round": number, "prompts": len(examples), "samples": len(flat), "passing": passing,
                       "acceptance_rate": round(100 * passing / max(1, len(flat)), 2), "kept": len(kept),
                       "prompts_solved": len({i for i, _ in kept}),
                       "sample_mean_reward": round(sum(scored["total"]) / max(1, len(flat)), 4), "steps": 0}
                console.print(f"[bold]rft round {number}[/]: {passing} of {len(flat)} sampled answers pass "
                              f"({row['acceptance_rate']:.1f}%); training on {len(kept)}")
                if kept:
                    items = [answer_example(tokenizer, examples[i], text, max_length) for i, text in kept]
                    self.train_dataset = self._prepare_dataset(to_dataset(items), self.processing_class, self.args,
                                                               False, None, "train")
                    self.optimizer, self.lr_scheduler = None, None  # a fresh optimizer and schedule each round
                    self._offset, self._round = total, number
                    result = super().train(**kwargs)
                    row["steps"] = self.state.global_step
                    total += self.state.global_step
                    row["train_loss"] = round(result.training_loss, 4)
                self.final_held_out = held_out(self.model, tokenizer, label=f"round {number}")  # the last: "after"
                row["held_out"] = {k: v for k, v in self.final_held_out.items() if k != "samples"}
                describe_rewards(console, f"after round {number}", row["held_out"])
                rounds.append(row)
                ctx.run.write_json("eval/rft_rounds.json", rounds)
                if any(getattr(cb, "requested", False) for cb in self.callback_handler.callbacks):  # Ctrl-C
                    break
            self.state.global_step = total
            self.rft_summary = {"rounds": rounds, "keep": rft.keep, "threshold": rft.threshold,
                                "samples_per_prompt": rft.samples_per_prompt, "temperature": rft.temperature,
                                "kept_total": sum(r["kept"] for r in rounds)}
            return result

    # The trainer is built on a one-row placeholder (TRL needs a dataset); each round replaces it with its answers.
    first = data.train[0]
    placeholder = to_dataset([answer_example(tokenizer, first, str(first["columns"].get("reference") or "ok"),
                                             max_length)])
    return sft_trainer(ctx, model, placeholder, None, callbacks, trainer_cls=RFTTrainer)


def _rft_checks(recipe) -> list[tuple[str, str]]:
    problems = needs_a_reward(recipe)
    default = type(recipe.rl)()
    for key in type(recipe.rl).model_fields:
        if key in RL_KEYS_READ or key == "kl_coef" and recipe.rl.kl_coef is None:
            continue
        if getattr(recipe.rl, key) != getattr(default, key):
            instead = RL_KEY_INSTEAD.get(key)
            problems.append((f"rl.{key}", f"method rft does not read rl.{key} (it samples, filters and fine-tunes: "
                                          + (f"set {instead} instead" if instead else "no policy-gradient settings")
                                          + "); remove it"))
    return problems


register(Method(
    name="rft", family="rl", data="prompts",
    summary="rejection sampling: sample answers, keep those rl.rewards pass, SFT on them; repeat for rounds",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, reads=("rl", "rft"),
    refuses=(NO_PACKING, *NO_HELD_OUT_LOSS,
             Refusal("train.save_every", lambda recipe: bool(recipe.train.save_every),
                     "method rft resamples from the model each round, so a run restarts rather than resumes and writes "
                     "no checkpoints: remove train.save_every")),
    check=_rft_checks, resumable=False, seeds="seed 000 step 13", hooks={"scores": "rewards"}))
