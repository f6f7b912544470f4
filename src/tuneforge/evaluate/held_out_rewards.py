"""A policy's held-out reward: greedy completions for held-out prompts scored by every reward of the run (mean, per
reward, pass rates, the answer-checking reward's pass rate as the accuracy), and the KL to the reference over training
read back from metrics.jsonl (bounded KL is part of the RL proof)."""

from __future__ import annotations

ANSWER_REWARDS = ("exact_answer", "code_tests", "json_schema", "regex")  # which pass rate is the "accuracy", in order


def held_out_scorer(recipe, data, device, rewards=None):
    """A function (model, tokenizer, label) -> the held-out reward summary, with the run's rewards (built here when
    none are given). ppo without rl.rewards is scored by its reward model alone."""
    if rewards is None:
        from tuneforge.rewards import build_rewards

        rewards = build_rewards(recipe.rl.rewards, base_dir=recipe.source_dir, device=device,
                                reward_model_path=recipe.rl.reward_model, trust_remote_code=recipe.model.trust_remote_code)
    examples = data.eval[: recipe.rl.eval_prompts or None] or data.train[: recipe.rl.eval_prompts or 20]
    held_out = bool(data.eval)

    def score(model, tokenizer, *, label: str) -> dict:
        return score_policy(model, tokenizer, examples, rewards, max_new_tokens=recipe.rl.max_new_tokens,
                            batch_size=recipe.eval.batch_size, held_out=held_out)

    return score


def score_policy(model, tokenizer, examples: list[dict], rewards, *, max_new_tokens: int, batch_size: int = 16,
                 held_out: bool = True, samples: int = 8) -> dict:
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.rewards import score_all

    texts = generate_answers(model, tokenizer, [e["prompt_text"] for e in examples], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    chat = bool(tokenizer.chat_template)
    prompts = [e["prompt"] if chat else e["prompt_text"] for e in examples]
    completions = [[{"role": "assistant", "content": t}] if chat else t for t in texts]
    columns = {name: [e["columns"].get(name) for e in examples] for name in (examples[0]["columns"] if examples else {})}
    scores = score_all(rewards, prompts, completions, columns)
    n = len(examples)
    per = {name: round(sum(values) / max(1, n), 4) for name, values in scores["per_reward"].items()}
    passes = {r.name: round(100 * sum(v >= 1.0 for v in scores["per_reward"][r.name]) / max(1, n), 1)
              for r in rewards if r.binary}
    answer = next((r.name for kind in ANSWER_REWARDS for r in rewards if r.kind == kind), None)
    return {"n": n, "held_out": held_out, "mean_reward": round(sum(scores["total"]) / max(1, n), 4),
            "per_reward": per, "pass_rate": passes, "accuracy": passes.get(answer) if answer else None,
            "accuracy_reward": answer,
            "mean_length": round(sum(len(t) for t in texts) / max(1, n), 1),
            "samples": [{"prompt": e["prompt_text"][-300:], "completion": t, "reward": round(s, 4)}
                        for e, t, s in list(zip(examples, texts, scores["total"]))[:samples]]}


def describe_rewards(console, label: str, result: dict) -> None:
    accuracy = f", accuracy {result['accuracy']:.1f}% ({result['accuracy_reward']})" if result.get("accuracy") is not None else ""
    per = ", ".join(f"{k} {v:.3f}" for k, v in result["per_reward"].items())
    console.print(f"[bold]held-out reward[/] ({label}) on {result['n']} prompts: mean {result['mean_reward']:.3f}"
                  f"{accuracy}; {per}")


def kl_summary(run) -> dict | None:
    """The KL to the reference over training, from metrics.jsonl (bounded KL is part of the PPO proof)."""
    values = [row[key] for row in run.metrics() for key in ("objective/kl", "kl") if isinstance(row.get(key), (int, float))]
    if not values:
        return None
    return {"first": round(values[0], 4), "last": round(values[-1], 4), "max": round(max(values), 4),
            "mean": round(sum(values) / len(values), 4), "n": len(values)}
