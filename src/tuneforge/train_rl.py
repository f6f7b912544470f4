"""`tuneforge train` for reward models and RL (reward, ppo, grpo, rloo, online_dpo, gkd): the same life as train.py,
with what these methods need instead of SFT's data and scores.

1. check   recipe (rl: section), data (pairs for reward, prompts for RL, conversations for gkd), rewards (custom
           files imported and every reward called once on a training example), doctor -- before a run directory exists;
2. set up  tokenizer, model (a one-output sequence-classification head for reward; the causal LM otherwise), adapter;
3. score   before training, on held-out data: reward -> pairwise accuracy (r(chosen) > r(rejected));
           ppo/grpo/rloo/online_dpo -> greedy completions for held-out prompts scored by every reward (mean reward,
           per-reward means, accuracy = pass rate of the answer-checking reward); gkd -> the SFT generation metrics;
4. train   the method's TRL trainer (methods/), metrics.jsonl (reward, KL, entropy, value loss, ... per step);
5. save    adapter/ or model/ with the tokenizer;
6. score   the same held-out measures after training -> eval/rewards.json or eval/reward.json, summary.json, report.
"""

from __future__ import annotations

import time
from pathlib import Path

from tuneforge.errors import DataError, RunDirError
from tuneforge.recipe import recipe_to_yaml
from tuneforge.run import RunDir, environment, start_run, target_run
from tuneforge.train import (absolute_data_paths, finish_run, forgetting_summary, print_data_summary,
                             probe_after_training, probe_before_training, run_doctor, score_model)

POLICY_METHODS = ("ppo", "grpo", "rloo", "online_dpo")
ANSWER_REWARDS = ("exact_answer", "code_tests", "json_schema", "regex")  # which pass rate is the "accuracy", in order


def train_rl(recipe, *, output: str | None = None, overwrite: bool = False, console=None, resume: bool = False,
             doctor: bool = True) -> RunDir:
    from rich.console import Console

    from tuneforge.models import load_tokenizer, pick_device, quiet_transformers
    from tuneforge.recipe import resolve_path

    console = console or Console()
    if resume and recipe.method == "ppo":
        raise RunDirError("method ppo cannot resume (its rollout loop writes no resumable checkpoints)",
                          fix="start it again with --overwrite, with fewer train.max_steps if time is short")
    path, checkpoint = target_run(recipe, output, overwrite=overwrite, resume=resume, console=console)
    check_start_adapter(recipe)
    quiet_transformers()
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
    data = prepare_rl_data(recipe, tokenizer)
    print_data_summary(console, data.stats)
    if recipe.method in ("grpo", "rloo", "online_dpo") or (recipe.method == "ppo" and recipe.rl.rewards):
        from tuneforge.rewards import build_rewards, probe_rewards

        # Built (and probed) now, so a missing custom file, a wrong signature or a missing data column fails here.
        recipe._rewards = build_rewards(recipe.rl.rewards, base_dir=getattr(recipe, "_source_dir", None),  # type: ignore[attr-defined]
                                        device=device, reward_model_path=recipe.rl.reward_model)
        probe_rewards(recipe._rewards, rl_row(data.train[0]))  # type: ignore[attr-defined]
        console.print("[bold]rewards[/] " + ", ".join(f"{r.name} x{r.weight:g}" for r in recipe._rewards))  # type: ignore[attr-defined]
    if doctor and not resume:
        run_doctor(recipe, tokenizer, data if hasattr(data, "train_examples") else None, console)
    absolute_data_paths(recipe)
    if recipe.rl.reward_model:
        resolved = resolve_path(recipe, recipe.rl.reward_model)
        if resolved and Path(resolved).exists():
            recipe.rl.reward_model = str(Path(resolved).resolve())
    run = start_run(path, checkpoint=checkpoint if resume else None, overwrite=overwrite, console=console)
    try:
        return _train_rl_in(run, recipe, tokenizer, data, device, console, checkpoint)
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise


def check_start_adapter(recipe) -> None:
    """model.adapter of a policy method must be a policy (e.g. the SFT stage), not a reward model's head: in
    stages [sft, reward, ppo] the ppo stage would otherwise start from the reward stage."""
    from tuneforge.errors import RecipeError

    if not recipe.model.adapter or recipe.method in ("reward",):
        return
    folder = Path(recipe.model.adapter)
    if (folder / "recipe.yaml").is_file():
        import yaml

        try:
            method = (yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("method")
        except (OSError, yaml.YAMLError):
            method = None
        if method == "reward":
            raise RecipeError([f"`model.adapter`: {folder} is a reward model (method: reward), not a policy to start "
                               f"{recipe.method} from; set model.adapter to the SFT run (e.g. the sft stage's folder) "
                               f"and give the reward run as rl.reward_model"])


def prepare_rl_data(recipe, tokenizer):
    from tuneforge.recipe import resolve_path

    resolve = lambda value: resolve_path(recipe, value)  # noqa: E731
    if recipe.method == "reward":
        from tuneforge.data.preference import prepare_preference_data

        data = prepare_preference_data(recipe, tokenizer, resolve)
        if not getattr(data, "accuracy_pairs", None):
            raise DataError("no held-out pairs to measure the reward model's accuracy on", where="data.eval",
                            fix="give data.eval, or more pairs so data.eval_fraction holds some out")
        return data
    if recipe.method == "gkd":
        from tuneforge.data.pipeline import prepare_data

        return prepare_data(recipe, tokenizer)
    from tuneforge.data.prompts import prepare_prompt_data

    return prepare_prompt_data(recipe, tokenizer, resolve)


def rl_row(example: dict) -> dict:
    """A prompt example as the rewards see one row: prompt + the data's columns."""
    return {"prompt": example["prompt"], **example["columns"]}


def _train_rl_in(run: RunDir, recipe, tokenizer, data, device: str, console, checkpoint) -> RunDir:
    import torch
    from transformers import PrinterCallback, set_seed

    from tuneforge.adapters import apply_adapter, describe_trainable, trainable_parameters
    from tuneforge.guards import InterruptGuard, NumericalGuard
    from tuneforge.methods import get_method
    from tuneforge.progress import ProgressCallback

    method = recipe.method
    if checkpoint is None:
        run.file("recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
        run.write_json("environment.json", environment())
        run.write_json("data_stats.json", data.stats.__dict__)
    set_seed(recipe.train.seed)
    console.print(f"[bold]model[/] {recipe.model.name} on {device}")
    adapter_loaded = False
    if method == "reward":
        from tuneforge.methods.reward import apply_reward_adapter, load_reward_base, pairwise_accuracy

        model = load_reward_base(recipe, device, console)
        model.config.pad_token_id = tokenizer.pad_token_id
        held_out = data.accuracy_pairs[: recipe.rl.eval_prompts or None]
        before = run.read_json("eval/reward.json", {}).get("before") if checkpoint is not None else None
        if before is None:
            before = pairwise_accuracy(model, tokenizer, held_out)
        console.print(f"[bold]pairwise accuracy[/] (untrained head) on {before['n']} held-out pairs: "
                      f"{before['accuracy']:.1f}%")
        run.write_json("eval/reward.json", {"before": before})
        model = apply_reward_adapter(model, recipe, recipe.train.gradient_checkpointing)
    else:
        from tuneforge.data.template import align_eos
        from tuneforge.methods.common import load_start_adapter
        from tuneforge.models import load_base_model

        model = load_base_model(recipe.model, quant=recipe.quant if recipe.adapter.type == "qlora" else None,
                                device=device)
        eos_ids = align_eos(tokenizer, model)
        console.print(f"generation stops at token ids {eos_ids} ({tokenizer.convert_ids_to_tokens(eos_ids)})")
        model, adapter_loaded = load_start_adapter(model, recipe, console)
    before = run.read_json("eval/rewards.json", {}).get("before") if checkpoint is not None else None
    scorer = None
    if method in POLICY_METHODS:
        scorer = held_out_scorer(recipe, data, device)
        if before is None:
            before = scorer(model, tokenizer, label="start")
            run.write_json("eval/rewards.json", {"before": before})
        describe_rewards(console, "start", before)
    baseline = None
    if method == "gkd" and data.eval_examples and recipe.eval.baseline:
        from tuneforge.evaluate.metrics import resolve_metrics

        metric_specs = resolve_metrics(recipe.eval.metrics, base_dir=getattr(recipe, "_source_dir", None))
        baseline = run.read_json("eval/baseline.json") if checkpoint is not None else None
        if baseline is None:
            baseline = score_model(model, tokenizer, data.eval_examples, recipe, metric_specs, console, label="base model")
            run.write_json("eval/baseline.json", baseline)
    probe_before = None
    if method != "reward":
        probe_before = probe_before_training(run, recipe, model, tokenizer, console, resumed=checkpoint is not None)
    if method != "reward" and not adapter_loaded:
        model = apply_adapter(model, recipe, gradient_checkpointing=recipe.train.gradient_checkpointing)
    console.print(describe_trainable(model))
    trainable_params, total_params = trainable_parameters(model)

    train_dataset, eval_dataset = method_datasets(recipe, data, tokenizer)
    numerical, interrupt = NumericalGuard(), InterruptGuard()
    callbacks = [ProgressCallback(run, console), numerical, interrupt]
    trainer = get_method(method)(recipe, model, tokenizer, train_dataset, eval_dataset, run, device, callbacks)
    trainer.remove_callback(PrinterCallback)
    base_loss = None
    if method == "gkd" and eval_dataset is not None and checkpoint is None:  # reward: pairwise accuracy says it
        base_loss = trainer.evaluate()["eval_loss"]
        run.set_status("running", base_eval_loss=base_loss)
    started = time.time()
    with interrupt:
        if method == "ppo":
            trainer.train()
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.time() - started
    numerical.raise_if_faulted(run)
    if interrupt.requested:
        run.set_status("interrupted", step=trainer.state.global_step, finished=time.time())
        console.print(f"[yellow]stopped at step {trainer.state.global_step}.[/]")
        return run

    policy = getattr(trainer, "policy_for_eval", None) or trainer.model
    if hasattr(policy, "policy"):  # PPO's policy+value wrapper
        policy = policy.policy
    weights = run.file("adapter" if recipe.uses_lora else "model")
    trainer.save_model(str(weights))
    if run.is_main:
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(str(weights))
        if method != "reward":
            policy.generation_config.save_pretrained(str(weights))
    tuned_loss = trainer.evaluate()["eval_loss"] if method == "gkd" and eval_dataset is not None else None
    if tuned_loss is not None:
        run.append_metrics({"step": trainer.state.global_step, "eval_loss": tuned_loss, "final": True})

    result = None
    if method == "reward":
        after = pairwise_accuracy(trainer.model, tokenizer, held_out)
        result = {"before": run.read_json("eval/reward.json", {}).get("before"), "after": after}
        run.write_json("eval/reward.json", result)
        console.print(f"[bold]pairwise accuracy[/] (trained) on {after['n']} held-out pairs: {after['accuracy']:.1f}% "
                      f"(margin {after['mean_margin']:+.3f})")
    elif scorer is not None:
        after = scorer(policy, tokenizer, label="tuned")
        result = {"before": before, "after": after}
        run.write_json("eval/rewards.json", result)
        describe_rewards(console, "tuned", after)
    tuned = None
    if baseline is not None:
        tuned = score_model(policy, tokenizer, data.eval_examples, recipe, metric_specs, console, label="tuned model")
        run.write_json("eval/tuned.json", tuned)
    forgetting = probe_after_training(run, recipe, policy, tokenizer, probe_before)
    from tuneforge.evaluate.baselines import baseline_table

    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.state.global_step,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "eval_loss": {"base": base_loss, "tuned": tuned_loss},
        "metrics": baseline_table({"base": baseline, "few_shot": None, "tuned": tuned}) if baseline else {},
        "forgetting": forgetting_summary(forgetting),
        "n_eval": (result or {}).get("after", {}).get("n", 0) if result else (tuned or {}).get("n", 0),
        "reward_model" if method == "reward" else "rl": result,
        "kl": kl_summary(run) if method in POLICY_METHODS else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    return finish_run(run, summary, console, table=False)


def method_datasets(recipe, data, tokenizer):
    """(train, eval) datasets in the form the method's trainer takes."""
    method = recipe.method
    if method == "reward":
        from tuneforge.methods.reward import reward_pair_dataset

        return reward_pair_dataset(data.train_pairs), (reward_pair_dataset(data.eval_pairs) if data.eval_pairs else None)
    if method == "gkd":
        from tuneforge.methods.gkd import conversation_dataset

        return conversation_dataset(data.train_examples), (conversation_dataset(data.eval_examples)
                                                           if data.eval_examples else None)
    if method == "ppo":
        from tuneforge.data.prompts import prompt_id_dataset

        limit = recipe.rl.max_prompt_length or max(8, recipe.train.max_length - recipe.rl.max_new_tokens)
        return prompt_id_dataset(data.train, tokenizer, limit), (prompt_id_dataset(data.eval, tokenizer, limit)
                                                                 if data.eval else None)
    from tuneforge.data.prompts import prompt_dataset

    return prompt_dataset(data.train, tokenizer, data.columns), None


# ---------------------------------------------------------------------------------------------------------------
# Held-out reward: greedy completions for held-out prompts, scored by every reward


def held_out_scorer(recipe, data, device):
    """A function (model, tokenizer, label) -> the held-out reward summary. ppo without rl.rewards is scored by its
    reward model alone."""
    rewards = getattr(recipe, "_rewards", None)
    if rewards is None:
        from tuneforge.rewards import build_rewards

        rewards = build_rewards(recipe.rl.rewards, base_dir=getattr(recipe, "_source_dir", None), device=device,
                                reward_model_path=recipe.rl.reward_model)
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


def kl_summary(run: RunDir) -> dict | None:
    """The KL to the reference over training, from metrics.jsonl (bounded KL is part of the PPO proof)."""
    values = [row[key] for row in run.metrics() for key in ("objective/kl", "kl") if isinstance(row.get(key), (int, float))]
    if not values:
        return None
    return {"first": round(values[0], 4), "last": round(values[-1], 4), "max": round(max(values), 4),
            "mean": round(sum(values) / len(values), 4), "n": len(values)}
