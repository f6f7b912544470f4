"""`tuneforge train`: recipe -> run directory. The life of a run, in order:

1. check   everything that can fail without a model (recipe, data files, formats, masks) fails here, before
           the run directory exists, so a bad input never leaves a run behind;
2. set up  tokenizer, data, model (+ quantization), EOS aligned with the chat template, adapter;
3. score   the base model on the held-out set (generation metrics) and its held-out loss: the baseline,
           and a dry run of evaluation before the first training step (fail in seconds, not after an hour);
4. train   the method's TRL trainer, with progress and metrics.jsonl;
5. save    adapter/ or model/ with tokenizer, chat template and generation config (self-contained);
6. score   the tuned model the same way, and print base vs tuned.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuneforge.recipe import Recipe, recipe_to_yaml
from tuneforge.run import RunDir, environment, start_run, target_run


def train(recipe: Recipe, *, output: str | None = None, overwrite: bool = False, console=None,
          resume: bool = False, doctor: bool = True) -> RunDir:
    """Train into a new run directory, or (resume=True) continue the run at `output` from its last checkpoint."""
    from rich.console import Console

    console = console or Console()
    if recipe.stages:  # multi-stage: each stage is a run of its own under this run directory
        from tuneforge.methods.stages import train_stages

        return train_stages(recipe, output=output, overwrite=overwrite, console=console, resume=resume, doctor=doctor)
    from tuneforge.recipe import RL_METHODS
    from tuneforge.speed import resolve_for_run as speed_resolve_for_run

    if recipe.method in RL_METHODS:  # reward models and RL: their own data, scores and models (train_rl.py)
        speed_resolve_for_run(recipe, console)  # speed levers and checkpointing for this device (saved with the recipe)
        from tuneforge.train_rl import train_rl

        return train_rl(recipe, output=output, overwrite=overwrite, console=console, resume=resume, doctor=doctor)
    path, checkpoint = target_run(recipe, output, overwrite=overwrite, resume=resume, console=console)

    from tuneforge.data.pipeline import prepare_data
    from tuneforge.models import load_tokenizer, pick_device, quiet_transformers

    quiet_transformers()
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
    from tuneforge.evaluate.metrics import resolve_metrics

    metric_specs = resolve_metrics(recipe.eval.metrics, base_dir=getattr(recipe, "_source_dir", None))
    from tuneforge.methods.common import check_trackers

    check_trackers(recipe)
    from tuneforge.evaluate.lm_eval_tasks import check_tasks

    lm_eval_manager = check_tasks(recipe)  # eval.lm_eval_tasks: installed and known, before the run directory exists
    recipe._lm_eval_manager = lm_eval_manager  # type: ignore[attr-defined]
    data = prepare_data(recipe, tokenizer)
    print_data_summary(console, data.stats)
    speed_resolve_for_run(recipe, console, [len(e.input_ids) for e in data.train if hasattr(e, "input_ids")] or None)
    if doctor and not resume:  # preflight checks: errors stop here, before a run directory exists
        run_doctor(recipe, tokenizer, data, console)
    absolute_data_paths(recipe)

    run = start_run(path, checkpoint=checkpoint if resume else None, overwrite=overwrite, console=console)
    try:
        from tuneforge.guards import train_with_oom_retry  # train.oom_retry: smaller micro-batch, same effective batch

        return train_with_oom_retry(lambda r, c: _train_in(run, r, tokenizer, data, device, console, metric_specs,
                                                           checkpoint=c), recipe, run, checkpoint, console)
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise


def run_doctor(recipe: Recipe, tokenizer, data, console) -> None:
    """The preflight checks (guide/doctor.py): warnings shown, errors raised before a run directory exists."""
    from tuneforge.guide.doctor import doctor_recipe, raise_for_errors, render_findings

    findings = doctor_recipe(recipe, tokenizer=tokenizer, data=data)
    shown = [f for f in findings if f.severity != "info"]
    if shown:
        render_findings(console, shown, title="doctor")
    raise_for_errors(findings)


def absolute_data_paths(recipe: Recipe) -> None:
    """The saved recipe names the data files by absolute path, so eval/resume work from any directory."""
    from tuneforge.recipe import resolve_path

    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        resolved = resolve_path(recipe, value)
        if value and resolved and Path(resolved).exists():
            setattr(recipe.data, key, str(Path(resolved).resolve()))


def _train_in(run: RunDir, recipe: Recipe, tokenizer, data, device: str, console, metric_specs,
              checkpoint=None) -> RunDir:
    import torch
    from transformers import PrinterCallback, set_seed

    from tuneforge.adapters import apply_adapter, describe_trainable, trainable_parameters
    from tuneforge.data.pipeline import to_dataset
    from tuneforge.data.template import align_eos
    from tuneforge.evaluate.baselines import baseline_table
    from tuneforge.guards import InterruptGuard, NumericalGuard
    from tuneforge.methods import get_method
    from tuneforge.models import load_base_model
    from tuneforge.progress import ProgressCallback

    if checkpoint is None:
        run.file("recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
        run.write_json("environment.json", environment())
        run.write_json("data_stats.json", data.stats.__dict__)
    else:  # drop metric rows logged after the checkpoint: they are logged again
        step = int(checkpoint.name.split("-")[-1])
        kept = [row for row in run.metrics() if row.get("step", 0) <= step]
        run.file("metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    set_seed(recipe.train.seed)

    console.print(f"[bold]model[/] {recipe.model.name} on {device}")
    model = load_base_model(recipe.model, quant=recipe.quant if recipe.adapter.type == "qlora" else None, device=device,
                            attention=recipe.speed.attention)
    eos_ids = align_eos(tokenizer, model)
    console.print(f"generation stops at token ids {eos_ids} ({tokenizer.convert_ids_to_tokens(eos_ids)})")
    from tuneforge.data.preference import PREFERENCE_METHODS
    from tuneforge.methods.common import load_start_adapter

    model, adapter_loaded = load_start_adapter(model, recipe, console)  # model.adapter: e.g. the SFT stage's adapter
    preference = recipe.method in PREFERENCE_METHODS  # data.eval_examples: prompt + chosen answer, for eval.metrics

    from tuneforge.evaluate.contamination import contamination_report, describe

    contamination = contamination_report(data.train_examples, data.eval_examples)
    run.write_json("eval/contamination.json", contamination)
    console.print(describe(contamination))

    # Before training: the base model zero-shot and with a few-shot prompt (the prompt-only baseline), and the
    # general-ability probe. Also a dry run of generation before any GPU hour is spent on training.
    scored = recipe.method in ("sft",) + tuple(PREFERENCE_METHODS) and bool(data.eval_examples)
    baseline = run.read_json("eval/baseline.json") if checkpoint is not None else None
    if baseline is None and recipe.eval.baseline and scored:
        baseline = score_model(model, tokenizer, data.eval_examples, recipe, metric_specs, console, label="base model")
        run.write_json("eval/baseline.json", baseline)
    few_shot = run.read_json("eval/few_shot.json") if checkpoint is not None else None
    if few_shot is None and recipe.eval.baseline and scored and recipe.eval.few_shot and not preference:
        from tuneforge.evaluate.baselines import few_shot_examples

        shots = few_shot_examples(data.eval_examples, data.train_examples, k=recipe.eval.few_shot, seed=recipe.train.seed,
                                  as_text=not tokenizer.chat_template)
        few_shot = score_model(model, tokenizer, shots, recipe, metric_specs, console,
                               label=f"base model, {recipe.eval.few_shot}-shot prompt")
        run.write_json("eval/few_shot.json", few_shot)
    probe_before = probe_before_training(run, recipe, model, tokenizer, console, resumed=checkpoint is not None)

    if not adapter_loaded:
        model = apply_adapter(model, recipe, gradient_checkpointing=recipe.train.gradient_checkpointing)
    console.print(describe_trainable(model))
    trainable_params, total_params = trainable_parameters(model)
    from tuneforge.speed import prepare_model

    prepare_model(model, recipe)

    build = get_method(recipe.method)
    eval_dataset = to_dataset(data.eval) if data.eval else None
    train_dataset = to_dataset(data.train)
    preference_start = None
    if preference:
        from tuneforge.methods.preference import answer_logps, preference_accuracy, preference_datasets

        train_dataset, eval_dataset = preference_datasets(recipe, data)
        held_out = data.accuracy_pairs[: recipe.preference.eval_pairs or None]
        preference_start = answer_logps(model, tokenizer, held_out)  # the model at the start = the reference
        accuracy = preference_accuracy(preference_start, preference_start, recipe.preference.beta)
        console.print(f"[bold]preference accuracy[/] (start) on {accuracy['n']} held-out pairs: "
                      f"{accuracy['reference_free']:.1f}% (mean log-prob of chosen > rejected)")
    numerical, interrupt = NumericalGuard(max_skips=recipe.train.skip_nonfinite_batches, run=run), InterruptGuard()
    callbacks = [ProgressCallback(run, console), numerical, interrupt]
    plateau = None
    if recipe.train.early_stopping is not None:
        from tuneforge.evaluate.early_stopping import PlateauStopping

        rule = recipe.train.early_stopping
        plateau = PlateauStopping(patience=rule.patience, min_delta=rule.min_delta, metric=rule.metric)
        callbacks.append(plateau)
    trainer = build(recipe, model, tokenizer, train_dataset, eval_dataset, run, device, callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback shows and records them
    from tuneforge.speed import prepare_trainer

    prepare_trainer(trainer, recipe)
    from tuneforge.checkpoints import install_checkpointing
    from tuneforge.guards import install_step_guards

    install_checkpointing(trainer, recipe, run, console)  # atomic saves; save_total_limit keeps the best; disk full
    install_step_guards(trainer, recipe, console)  # out of memory -> the step and the memory plan's advice
    if checkpoint is None:
        # Under FSDP2 accelerate must wrap the model together with the optimizer, which evaluate() before train()
        # would prevent; the base loss is then not measured (the tuned loss and the base generations still are).
        fsdp = getattr(trainer, "is_fsdp_enabled", False)
        base_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None and not fsdp else None
        run.set_status("running", base_eval_loss=base_loss)
    else:
        base_loss = (run.read_json("status.json", {}) or {}).get("base_eval_loss")

    started = time.time()
    with interrupt:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.time() - started
    numerical.raise_if_faulted(run)
    if interrupt.requested:
        run.set_status("interrupted", step=trainer.state.global_step, finished=time.time())
        console.print(f"[yellow]stopped at step {trainer.state.global_step}; checkpoint saved.[/] "
                      f"Continue with: tuneforge train --resume {run.path}")
        return run

    preference_result = None
    if preference:
        from tuneforge.methods.preference import drop_reference_adapter

        drop_reference_adapter(trainer.model)
        after = preference_accuracy(answer_logps(trainer.model, tokenizer, held_out), preference_start,
                                    recipe.preference.beta)
        preference_result = {"before": preference_accuracy(preference_start, preference_start, recipe.preference.beta),
                             "after": after}
        run.write_json("eval/preference.json", preference_result)
        console.print(f"[bold]preference accuracy[/] (tuned) on {after['n']} held-out pairs: {after['reference_free']:.1f}% "
                      f"reference-free, {after['implicit_reward']:.1f}% implicit reward vs the start model")
    weights = run.file("adapter" if recipe.uses_lora else "model")
    trainer.save_model(str(weights))
    if run.is_main:  # under several processes only rank 0 writes (trainer.save_model already does so)
        tokenizer.save_pretrained(str(weights))
        model.generation_config.save_pretrained(str(weights))
    tuned_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None

    if tuned_loss is not None:
        run.append_metrics({"step": trainer.state.global_step, "eval_loss": tuned_loss, "final": True})
    if plateau is not None:
        run.write_json("eval/early_stopping.json", plateau.summary(run.file("checkpoints")))

    tuned = None
    if scored:
        tuned = score_model(trainer.model, tokenizer, data.eval_examples, recipe, metric_specs, console, label="tuned model")
        run.write_json("eval/tuned.json", tuned)
    forgetting = probe_after_training(run, recipe, trainer.model, tokenizer, probe_before)

    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.state.global_step,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "eval_loss": {"base": base_loss, "tuned": tuned_loss},
        "metrics": baseline_table({"base": baseline, "few_shot": few_shot, "tuned": tuned}),
        "forgetting": forgetting_summary(forgetting),
        "n_eval": tuned["n"] if tuned else 0,
        "preference": preference_result,
        "skipped_nonfinite_steps": numerical.skipped,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    return finish_run(run, summary, console)


def probe_before_training(run: RunDir, recipe: Recipe, model, tokenizer, console, *, resumed: bool) -> dict | None:
    """The general-ability probe (+ eval.lm_eval_tasks) on the model before training; a resumed run keeps its own."""
    if not recipe.eval.forgetting:
        return None
    probe = (run.read_json("eval/forgetting.json", {}) or {}).get("before") if resumed else None
    if probe is None:
        from tuneforge.evaluate.forgetting import run_probe

        probe = run_probe(model, tokenizer)
        add_lm_eval_scores(probe, model, tokenizer, recipe)
        run.write_json("eval/forgetting.json", {"before": probe})
    console.print(f"[bold]general probe[/] (base): {probe['accuracy']:.1f}% of {probe['n']} items")
    return probe


def probe_after_training(run: RunDir, recipe: Recipe, model, tokenizer, before: dict | None) -> dict | None:
    """The same probe on the tuned model, compared with `before` (flagged past eval.forgetting_threshold)."""
    if before is None:
        return None
    from tuneforge.evaluate.forgetting import compare, run_probe

    after = run_probe(model, tokenizer)
    add_lm_eval_scores(after, model, tokenizer, recipe)
    comparison = compare(before, after, threshold=recipe.eval.forgetting_threshold)
    run.write_json("eval/forgetting.json", {"before": before, "after": after, "comparison": comparison})
    return comparison


def forgetting_summary(comparison: dict | None) -> dict | None:
    return comparison and {"flagged": comparison["flagged"], "message": comparison["message"], **comparison["scores"]}


def finish_run(run: RunDir, summary: dict, console, *, table: bool = True) -> RunDir:
    """summary.json, status completed, report.html (rank 0), and the terminal summary."""
    run.write_json("summary.json", summary)
    run.set_status("completed", finished=time.time())
    if not run.is_main:
        return run
    from tuneforge.report import write_report

    report = write_report(run.path)
    if table:
        print_summary(console, run, summary)
    else:
        console.print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s; run directory: {run.path}")
    console.print(f"report: {report}")
    return run


def add_lm_eval_scores(probe: dict, model, tokenizer, recipe) -> None:
    """eval.lm_eval_tasks: their scores join the probe result, so compare() treats them as probe rows."""
    if recipe.eval.lm_eval_tasks:
        from tuneforge.evaluate.lm_eval_tasks import run_tasks

        probe["lm_eval"] = run_tasks(model, tokenizer, recipe, getattr(recipe, "_lm_eval_manager", None),
                                     batch_size=recipe.train.batch_size)


def score_model(model, tokenizer, examples, recipe, metric_specs, console, *, label: str) -> dict:
    from rich.progress import Progress

    from tuneforge.evaluate.scoring import evaluate_generation

    with Progress(console=console, transient=True) as progress:
        result = evaluate_generation(model, tokenizer, examples, metrics=metric_specs,
                                     max_examples=recipe.eval.max_examples, max_new_tokens=recipe.eval.max_new_tokens,
                                     batch_size=recipe.eval.batch_size, progress=progress, label=label)
    shown = ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items())
    console.print(f"[bold]{label}[/] on {result['n']} held-out examples: {shown}")
    return result


def print_data_summary(console, stats) -> None:
    split = " (split off the training file by hash)" if stats.eval_split_from_train else ""
    console.print(
        f"[bold]data[/] format {stats.format}: {stats.train_examples} train / {stats.eval_examples} eval examples{split}; "
        f"{stats.train_tokens:,} tokens, {stats.loss_tokens:,} carry loss; {stats.duplicates_removed} duplicates removed; "
        f"{stats.truncated} truncated at max_length {stats.max_length} ({stats.truncated_pct:.1f}%)"
        + (f"; {stats.dropped_no_loss} dropped (no answer token left)" if stats.dropped_no_loss else "")
    )


def print_summary(console, run: RunDir, summary: dict) -> None:
    from rich.table import Table

    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"{run.path.name}: held-out results ({summary['n_eval']} examples)")
    for column in ("", "base", "base few-shot", "tuned", "tuned - base"):
        table.add_column(column, justify="right")
    for name, values in summary["metrics"].items():
        base, few, tuned = values.get("base"), values.get("few_shot"), values.get("tuned")
        delta = f"{tuned - base:+.1f}" if base is not None and tuned is not None else ""
        table.add_row(name, cell(base), cell(few), cell(tuned), delta)
    losses = summary["eval_loss"]
    if losses["tuned"] is not None:
        base = losses["base"]
        table.add_row("eval loss", cell(base, 4), "", cell(losses["tuned"], 4),
                      f"{losses['tuned'] - base:+.4f}" if base is not None else "")
    forgetting = summary.get("forgetting")
    if forgetting:
        acc = forgetting.get("accuracy", {})
        table.add_row("general probe %", cell(acc.get("before")), "", cell(acc.get("after")),
                      f"{acc.get('delta', 0):+.1f}" + (" [red]FLAG[/]" if forgetting["flagged"] else ""))
    console.print(table)
    if forgetting and forgetting["flagged"]:
        console.print(f"[bold red]forgetting:[/] {forgetting['message']}")
    console.print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s; run directory: {run.path}")
