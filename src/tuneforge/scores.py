"""How a run scores its model before and after training: one scorer per kind of evaluation, named by each method's
declaration (`Method.hooks["scores"]`), plus the general-ability probe every policy run takes.

  generation  held-out generation metrics (eval.metrics) of the base model zero-shot, with a few-shot prompt (when
              the method says few_shot; the prompt-only baseline) and of the tuned model; preference methods add
              held-out preference accuracy (mean log-prob of chosen > rejected, and implicit reward vs the start)
  loss        the held-out loss only (continued pre-training: plain text has no answers to score)
  pairwise    a reward model's held-out pairwise accuracy, r(chosen) > r(rejected), before (untrained head) and after
  rewards     greedy completions for held-out prompts scored by every reward (mean, per reward, pass rate), and the
              KL to the reference over training from metrics.jsonl (rft: and each round's acceptance and reward)
  classification  a classification head's accuracy, macro-F1, per-class scores and confusion matrix, beside the
              majority class and the prompted base model (evaluate/classification.py)

Each scorer writes its files under the run's eval/ as it goes, so a resumed run keeps its "before" numbers, and
returns the fields it adds to summary.json.
"""

from __future__ import annotations

from tuneforge.errors import DataError


class Scorer:
    """Before/after scoring; the base does nothing (a method that only has a held-out loss)."""

    table = False  # the terminal's base-vs-tuned table

    def __init__(self, ctx):
        self.ctx = ctx

    def check(self) -> None:
        """Raise before the run directory exists when the data cannot be scored."""

    def before(self, model, *, resumed: bool) -> None:
        pass

    def start(self, model) -> None:
        """After the adapter is applied, before the first step (the model as training starts)."""

    def trained(self, trainer) -> None:
        """Right after training, before the weights are saved (e.g. the reference adapter is dropped here)."""

    def after(self, model, trainer) -> dict:
        return {"metrics": {}, "n_eval": 0}


class GenerationScorer(Scorer):
    table = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.baseline = self.few_shot = None
        self.preference_start = self.preference_result = None
        self.preference = ctx.spec.family == "preference"

    @property
    def scored(self) -> bool:
        return bool(getattr(self.ctx.data, "eval_examples", None))

    def before(self, model, *, resumed: bool) -> None:
        ctx, run, recipe = self.ctx, self.ctx.run, self.ctx.recipe
        if not self.scored:
            return
        self.baseline = run.read_json("eval/baseline.json") if resumed else None
        if self.baseline is None and recipe.eval.baseline:
            self.baseline = score_model(model, ctx, ctx.data.eval_examples, label="base model")
            run.write_json("eval/baseline.json", self.baseline)
        self.few_shot = run.read_json("eval/few_shot.json") if resumed else None
        if self.few_shot is None and recipe.eval.baseline and recipe.eval.few_shot and ctx.spec.hooks.get("few_shot"):
            from tuneforge.evaluate.baselines import few_shot_examples

            shots = few_shot_examples(ctx.data.eval_examples, ctx.data.train_examples, k=recipe.eval.few_shot,
                                      seed=recipe.train.seed, as_text=not ctx.tokenizer.chat_template)
            self.few_shot = score_model(model, ctx, shots, label=f"base model, {recipe.eval.few_shot}-shot prompt")
            run.write_json("eval/few_shot.json", self.few_shot)

    def start(self, model) -> None:
        if not self.preference:
            return
        from tuneforge.methods.preference import answer_logps, preference_accuracy

        ctx = self.ctx
        self.held_out = ctx.data.accuracy_pairs[: ctx.recipe.preference.eval_pairs or None]
        if not self.held_out:  # unpaired data (kto's prompt/completion/label): no pairs to compare
            ctx.console.print("preference accuracy: no held-out pairs (unpaired data), not measured")
            return
        self.preference_start = answer_logps(model, ctx.tokenizer, self.held_out)  # the model at the start = the reference
        accuracy = preference_accuracy(self.preference_start, self.preference_start, ctx.recipe.preference.beta)
        ctx.console.print(f"[bold]preference accuracy[/] (start) on {accuracy['n']} held-out pairs: "
                          f"{accuracy['reference_free']:.1f}% (mean log-prob of chosen > rejected)")

    def trained(self, trainer) -> None:
        """Preference runs: the reference adapter TRL added is dropped (it is not saved), then held-out preference
        accuracy of the tuned policy."""
        if not self.preference:
            return
        from tuneforge.methods.preference import answer_logps, drop_reference_adapter, preference_accuracy

        ctx = self.ctx
        beta = ctx.recipe.preference.beta
        drop_reference_adapter(trainer.model)
        if self.preference_start is None:  # no held-out pairs to measure
            return
        after = preference_accuracy(answer_logps(trainer.model, ctx.tokenizer, self.held_out), self.preference_start, beta)
        self.preference_result = {"before": preference_accuracy(self.preference_start, self.preference_start, beta),
                                  "after": after}
        ctx.run.write_json("eval/preference.json", self.preference_result)
        ctx.console.print(f"[bold]preference accuracy[/] (tuned) on {after['n']} held-out pairs: "
                          f"{after['reference_free']:.1f}% reference-free, {after['implicit_reward']:.1f}% implicit "
                          f"reward vs the start model")

    def after(self, model, trainer) -> dict:
        from tuneforge.evaluate.baselines import baseline_table, metric_deltas

        ctx = self.ctx
        out = {"preference": self.preference_result if self.preference else None}
        tuned = None
        if self.scored and (self.baseline is not None or ctx.spec.family != "distillation"):
            tuned = score_model(model, ctx, ctx.data.eval_examples, label="tuned model")
            ctx.run.write_json("eval/tuned.json", tuned)
        if tuned is not None and self.baseline is not None and ctx.recipe.eval.judge is not None:
            from tuneforge.evaluate.judge import judge_inputs, judge_run
            from tuneforge.evaluate.judge_section import describe_judge_run

            judged = judge_run(ctx.recipe.eval.judge, *judge_inputs(self.baseline, tuned))
            ctx.run.write_json("eval/judge.json", judged)
            ctx.console.print(f"[bold]judge[/] ({judged['judge']}): {describe_judge_run(judged)}")
            out["judge"] = (judged.get("pairwise") or {}).get("tuned_win_rate")
        results = {"base": self.baseline, "few_shot": self.few_shot, "tuned": tuned}
        out["metrics"] = baseline_table(results) if tuned is not None else {}
        for name, deltas in (metric_deltas(results) if tuned is not None else {}).items():
            out["metrics"][name].update(deltas)  # beside base/few_shot/tuned: each delta with its ci95
        out["n_eval"] = tuned["n"] if tuned else 0
        return out


class PairwiseScorer(Scorer):
    """A reward model's held-out pairwise accuracy."""

    def check(self) -> None:
        if not getattr(self.ctx.data, "accuracy_pairs", None):
            raise DataError("no held-out pairs to measure the reward model's accuracy on", where="data.eval",
                            fix="give data.eval, or more pairs so data.eval_fraction holds some out")

    def before(self, model, *, resumed: bool) -> None:
        from tuneforge.methods.reward import pairwise_accuracy

        ctx = self.ctx
        self.held_out = ctx.data.accuracy_pairs[: ctx.recipe.rl.eval_prompts or None]
        before = ctx.run.read_json("eval/reward.json", {}).get("before") if resumed else None
        if before is None:
            before = pairwise_accuracy(model, ctx.tokenizer, self.held_out)
        ctx.console.print(f"[bold]pairwise accuracy[/] (untrained head) on {before['n']} held-out pairs: "
                          f"{before['accuracy']:.1f}%")
        ctx.run.write_json("eval/reward.json", {"before": before})
        self.before_result = before

    def after(self, model, trainer) -> dict:
        from tuneforge.methods.reward import pairwise_accuracy

        ctx = self.ctx
        after = pairwise_accuracy(trainer.model, ctx.tokenizer, self.held_out)
        result = {"before": self.before_result, "after": after}
        ctx.run.write_json("eval/reward.json", result)
        ctx.console.print(f"[bold]pairwise accuracy[/] (trained) on {after['n']} held-out pairs: "
                          f"{after['accuracy']:.1f}% (margin {after['mean_margin']:+.3f})")
        return {"metrics": {}, "n_eval": after["n"], "reward_model": result}


class RewardsScorer(Scorer):
    """A policy's held-out reward: greedy completions for held-out prompts, scored by every reward."""

    def before(self, model, *, resumed: bool) -> None:
        from tuneforge.evaluate.held_out_rewards import describe_rewards, held_out_scorer

        ctx = self.ctx
        self.score = held_out_scorer(ctx.recipe, ctx.data, ctx.device, ctx.rewards)
        self.before_result = ctx.run.read_json("eval/rewards.json", {}).get("before") if resumed else None
        if self.before_result is None:
            self.before_result = self.score(model, ctx.tokenizer, label="start")
            ctx.run.write_json("eval/rewards.json", {"before": self.before_result})
        describe_rewards(ctx.console, "start", self.before_result)

    def after(self, model, trainer) -> dict:
        from tuneforge.evaluate.held_out_rewards import describe_rewards, kl_summary

        ctx = self.ctx
        # rft scores the held-out prompts after each round; its last round's score is the tuned model's
        after = getattr(trainer, "final_held_out", None) or self.score(model, ctx.tokenizer, label="tuned")
        result = {"before": self.before_result, "after": after}
        ctx.run.write_json("eval/rewards.json", result)
        describe_rewards(ctx.console, "tuned", after)
        rounds = {"rft": trainer.rft_summary} if hasattr(trainer, "rft_summary") else {}
        return {"metrics": {}, "n_eval": after["n"], "rl": result, "kl": kl_summary(ctx.run), **rounds}


SCORERS = {"generation": GenerationScorer, "loss": Scorer, "pairwise": PairwiseScorer, "rewards": RewardsScorer}


def scorer_for(ctx) -> Scorer:
    kind = ctx.spec.hooks.get("scores", "loss")
    if kind == "classification":  # a classification head's accuracy, macro-F1, confusion (method classify)
        from tuneforge.evaluate.classification import ClassificationScorer

        return ClassificationScorer(ctx)
    return SCORERS[kind](ctx)


def score_model(model, ctx, examples, *, label: str) -> dict:
    """Generation metrics (eval.metrics) of `model` on `examples`, with a progress bar."""
    from rich.progress import Progress

    from tuneforge.evaluate.scoring import evaluate_generation

    recipe, console = ctx.recipe, ctx.console
    with Progress(console=console, transient=True) as progress:
        result = evaluate_generation(model, ctx.tokenizer, examples, metrics=ctx.metric_specs,
                                     max_examples=recipe.eval.max_examples, max_new_tokens=recipe.eval.max_new_tokens,
                                     batch_size=recipe.eval.batch_size, progress=progress, label=label)
    shown = ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items())
    cut = result.get("truncated_prompts")
    console.print(f"[bold]{label}[/] on {result['n']} held-out examples: {shown}"
                  + (f" ({cut} prompt(s) longer than the model's context kept their last tokens)" if cut else ""))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The held-out loss per example (supervised runs), for the interval of its before/after delta


def held_out_losses(ctx, model, key: str, *, resumed: bool = False) -> list | None:
    """Each held-out example's [summed loss, loss tokens] under `model` (key: base or tuned), for supervised runs
    (their eval data is tokenized examples); kept in eval/loss_examples.json so a resumed run keeps its base."""
    from tuneforge.ranks import is_launched

    data = ctx.data
    if ctx.spec.family != "supervised" or not getattr(data, "eval", None) or not hasattr(data.eval[0], "labels"):
        return None
    if is_launched():  # several processes: the model may be sharded; the loss itself is still measured by the trainer
        return None
    saved = (ctx.run.read_json("eval/loss_examples.json", {}) or {}) if ctx.run.is_main else {}
    if resumed and key in saved:
        return saved[key]
    from tuneforge.evaluate.loss import mean_loss

    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    saved[key] = mean_loss(model, data.eval, batch_size=ctx.recipe.eval.batch_size, pad_token_id=pad,
                           per_example=True)["per_example"]
    if ctx.run.is_main:
        ctx.run.write_json("eval/loss_examples.json", saved)
    return saved[key]


def token_weighted_loss(losses: list) -> float | None:
    """The held-out loss of [summed loss, loss tokens] rows: nats per loss-carrying token over the whole set (the
    mean the interval of loss_delta is about; the Trainer's eval loss is a mean of per-batch means instead)."""
    tokens = sum(n for _, n in losses)
    return sum(s for s, _ in losses) / tokens if tokens else None


def loss_delta(before: list | None, after: list | None) -> dict:
    """{"ci95": [low, high]} of the held-out loss delta (tuned - base, token-weighted, paired bootstrap), or {}."""
    if not before or not after or len(before) != len(after):
        return {}
    from tuneforge.evaluate.intervals import paired_ratio_delta

    delta = paired_ratio_delta(before, after)
    return {"delta": delta["delta"], "ci95": delta["ci95"]} if delta["ci95"] is not None else {}


# ---------------------------------------------------------------------------------------------------------------
# The general-ability probe (+ eval.lm_eval_tasks), before and after, for every run that trains a policy


def probe_before_training(ctx, model, *, resumed: bool) -> dict | None:
    """The probe on the model before training; a resumed run keeps its own."""
    run, recipe = ctx.run, ctx.recipe
    if not recipe.eval.forgetting:
        return None
    probe = (run.read_json("eval/forgetting.json", {}) or {}).get("before") if resumed else None
    if probe is None:
        from tuneforge.evaluate.forgetting import run_probe

        probe = run_probe(model, ctx.tokenizer)
        add_lm_eval_scores(probe, model, ctx)
        run.write_json("eval/forgetting.json", {"before": probe})
    ctx.console.print(f"[bold]general probe[/] (base): {probe['accuracy']:.1f}% of {probe['n']} items")
    return probe


def probe_after_training(ctx, model, before: dict | None) -> dict | None:
    """The same probe on the tuned model, compared with `before` (flagged past eval.forgetting_threshold)."""
    if before is None:
        return None
    from tuneforge.evaluate.forgetting import compare, run_probe

    after = run_probe(model, ctx.tokenizer)
    add_lm_eval_scores(after, model, ctx)
    comparison = compare(before, after, threshold=ctx.recipe.eval.forgetting_threshold)
    ctx.run.write_json("eval/forgetting.json", {"before": before, "after": after, "comparison": comparison})
    return comparison


def forgetting_summary(comparison: dict | None) -> dict | None:
    return comparison and {"flagged": comparison["flagged"], "message": comparison["message"], **comparison["scores"]}


def add_lm_eval_scores(probe: dict, model, ctx) -> None:
    """eval.lm_eval_tasks: their scores join the probe result, so compare() treats them as probe rows."""
    if ctx.recipe.eval.lm_eval_tasks:
        from tuneforge.evaluate.lm_eval_tasks import run_tasks

        probe["lm_eval"] = run_tasks(model, ctx.tokenizer, ctx.recipe, ctx.lm_eval, batch_size=ctx.recipe.train.batch_size)
