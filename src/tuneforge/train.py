"""`tuneforge train`: recipe -> run directory. The one life of every run, whatever the method:

1. check   everything that can fail without a model -- the recipe and the keys its method refuses, data files,
           formats and masks, metrics, trackers, lm-eval tasks, rewards (each called once on a training example),
           the speed levers for this device, doctor -- fails here, before the run directory exists, so a bad input
           never leaves a run behind;
2. set up  tokenizer, data (the method's data kind), model (+ quantization; a reward model's one-output head),
           EOS aligned with the chat template, a start adapter (model.adapter), the new adapter, speed levers;
3. score   the model before training, as the method's declaration says (scores.py): generation metrics with the
           prompt-only baseline, preference accuracy, pairwise accuracy or held-out rewards; the general-ability
           probe; the held-out loss -- also a dry run of evaluation before any GPU hour is spent;
4. train   the method's trainer (methods/<name>.py builds it), under the same guards for all: progress and
           metrics.jsonl, trackers, non-finite steps skipped and counted, Ctrl-C, atomic checkpoints, out-of-memory
           advice and retry, early stopping;
5. save    adapter/ or model/ with tokenizer, chat template and generation config (self-contained);
6. score   the tuned model the same way; summary.json, report.html and the terminal summary.
"""

from __future__ import annotations

import time
from pathlib import Path

from tuneforge.errors import RecipeError, RunDirError
from tuneforge.recipe import Recipe, recipe_to_yaml
from tuneforge.run import RunContext, RunDir, environment, release_run, start_run, target_run

# Sections a method reads only when its declaration says so (Method.reads): a recipe that sets keys there for a
# method that ignores them is refused, naming the key.
METHOD_SECTIONS = ("preference", "rl", "distill", "classify", "rft")


def train(recipe: Recipe, *, output: str | None = None, overwrite: bool = False, console=None,
          resume: bool = False, doctor: bool = True, stage: bool = False) -> RunDir:
    """Train into a new run directory, or (resume=True) continue the run at `output` from its last checkpoint.
    `stage`: this recipe is one stage of a multi-stage run (its sections are shared with the other stages)."""
    from rich.console import Console

    from tuneforge.methods import method_spec

    console = console or Console()
    if recipe.federated is not None:  # rounds of client training on Flower, each client a run of this recipe
        import sys

        from tuneforge.federated.pieces import Pieces
        from tuneforge.federated.run import train_federated

        life = Pieces.from_life(sys.modules[__name__])  # this module's functions: federated/ never imports train.py
        return train_federated(recipe, output=output, overwrite=overwrite, console=console, resume=resume,
                               doctor=doctor, pieces=life)
    if recipe.stages:  # multi-stage: each stage is a run of its own under this run directory
        from tuneforge.stages import train_stages

        return train_stages(recipe, output=output, overwrite=overwrite, console=console, resume=resume, doctor=doctor)
    spec = method_spec(recipe.method)
    if resume and not spec.resumable:
        raise RunDirError(f"method {spec.name} cannot resume (its loop writes no resumable checkpoints)",
                          fix="start it again with --overwrite, with fewer train.max_steps if time is short")
    if not resume and not stage:
        refuse_unread_sections(recipe, spec)
    path, checkpoint = target_run(recipe, output, overwrite=overwrite, resume=resume, console=console)
    check_start_adapter(recipe, spec)
    if recipe.model.adapter:  # model.adapter must hold an adapter before a run directory exists
        from tuneforge.methods.common import adapter_folder

        adapter_folder(recipe.model.adapter)

    from tuneforge.evaluate.lm_eval_tasks import check_tasks
    from tuneforge.evaluate.metrics import resolve_metrics
    from tuneforge.methods.common import check_trackers
    from tuneforge.models import check_weight_files, load_tokenizer, pick_device, quiet_transformers

    quiet_transformers()
    check_weight_files(recipe.model.name, allow_pickle=recipe.model.allow_pickle)  # corrupt, truncated, or pickled code
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
    from tuneforge.vocab import add_tokens

    if add_tokens(tokenizer, recipe.model):  # model.add_tokens: the model's rows grow to match in load_model
        console.print(f"[bold]tokens[/] added {len(recipe.model.add_tokens) + len(recipe.model.add_special_tokens)} "
                      f"to the tokenizer (now {len(tokenizer)})")
    metric_specs = resolve_metrics(recipe.eval.metrics, base_dir=recipe.source_dir)
    check_trackers(recipe)
    lm_eval = check_tasks(recipe)  # eval.lm_eval_tasks: installed and known, before the run directory exists
    data = prepare_method_data(recipe, tokenizer, spec)
    from tuneforge.data.preview import print_data_summary

    print_data_summary(console, data.stats)
    rewards = build_run_rewards(recipe, spec, data, device, console)
    from tuneforge.speed import resolve_for_run

    lengths = [len(e.input_ids) for e in data.train if hasattr(e, "input_ids")] if spec.data != "prompts" else []
    recipe = resolve_for_run(recipe, console, lengths or None)  # a new recipe: levers decided for this device
    from tuneforge.adapter_checks import check_adapter_for_run

    check_adapter_for_run(recipe, data, lengths)  # soft prompt vs context; AdaLoRA's step count (adapter.total_step)
    if doctor and not resume:  # preflight checks: errors stop here, before a run directory exists
        run_doctor(recipe, tokenizer, data, console)
    absolute_paths(recipe)  # on the run's own (resolved) copy: the caller's recipe is not changed
    ctx = RunContext(recipe=recipe, spec=spec, tokenizer=tokenizer, data=data, device=device, console=console,
                     metric_specs=metric_specs, lm_eval=lm_eval, rewards=rewards)
    from tuneforge.scores import scorer_for

    scorer_for(ctx).check()

    run = start_run(path, checkpoint=checkpoint if resume else None, overwrite=overwrite, console=console)
    ctx.run = run
    try:
        from tuneforge.guards import train_with_oom_retry  # train.oom_retry: smaller micro-batch, same effective batch

        def attempt(r, c):
            ctx.recipe = r
            return _train_in(ctx, checkpoint=c)

        return train_with_oom_retry(attempt, recipe, run, checkpoint, console)
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    finally:
        release_run(run)  # the run directory's lock: another process may now resume, overwrite or merge into it


# ---------------------------------------------------------------------------------------------------------------
# 1. check


def refuse_unread_sections(recipe: Recipe, spec) -> None:
    """Keys set in a section the method does not read (e.g. preference.beta for sft, rl.* for dpo) would be silently
    ignored: refuse them, naming the first."""
    for section in METHOD_SECTIONS:
        if section in spec.reads:
            continue
        value, default = getattr(recipe, section), type(getattr(recipe, section))()
        changed = [key for key in type(value).model_fields if getattr(value, key) != getattr(default, key)]
        if changed:
            raise RecipeError([f"`{section}.{changed[0]}`: method {spec.name} does not read the {section}: section "
                               f"(it is for {section_users(section)}); remove it, or choose one of those methods"],
                              source=recipe.source_path)


def section_users(section: str) -> str:
    from tuneforge.methods import method_names, method_spec

    return ", ".join(name for name in method_names() if section in method_spec(name).reads)


def check_start_adapter(recipe: Recipe, spec) -> None:
    """model.adapter of a policy method must be a policy (e.g. the SFT stage), not a reward model's head: in
    stages [sft, reward, ppo] the ppo stage would otherwise start from the reward stage."""
    if not recipe.model.adapter or spec.family == "reward":
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


def prepare_method_data(recipe: Recipe, tokenizer, spec):
    """The data the method's kind needs: pairs, prompts, or conversations / text (data/)."""
    from tuneforge.recipe import resolve_path

    resolve = lambda value: resolve_path(recipe, value)  # noqa: E731
    if spec.data == "pairs":
        from tuneforge.data.preference import prepare_preference_data

        return prepare_preference_data(recipe, tokenizer, resolve)
    if spec.data == "labels":
        from tuneforge.data.labels import prepare_label_data

        return prepare_label_data(recipe, tokenizer, resolve)
    if spec.data == "prompts":
        from tuneforge.data.prompts import prepare_prompt_data

        return prepare_prompt_data(recipe, tokenizer, resolve)
    from tuneforge.data.pipeline import prepare_data

    return prepare_data(recipe, tokenizer)


def build_run_rewards(recipe: Recipe, spec, data, device: str, console):
    """rl.rewards (and rl.reward_model) built and each called once on a training example now, so a missing custom
    file, a wrong signature or a missing data column fails before the run directory exists. None for methods that
    score no rewards."""
    if spec.hooks.get("scores") != "rewards" or (spec.name == "ppo" and not recipe.rl.rewards):
        return None
    from tuneforge.rewards import build_rewards, probe_rewards

    rewards = build_rewards(recipe.rl.rewards, base_dir=recipe.source_dir, device=device,
                            reward_model_path=recipe.rl.reward_model, trust_remote_code=recipe.model.trust_remote_code)
    example = data.train[0]
    probe_rewards(rewards, {"prompt": example["prompt"], **example["columns"]})
    console.print("[bold]rewards[/] " + ", ".join(f"{r.name} x{r.weight:g}" for r in rewards))
    return rewards


def run_doctor(recipe: Recipe, tokenizer, data, console) -> None:
    """The preflight checks (guide/doctor): warnings shown, errors raised before a run directory exists."""
    from tuneforge.guide.doctor import doctor_recipe, raise_for_errors, render_findings

    findings = doctor_recipe(recipe, tokenizer=tokenizer, data=data if hasattr(data, "train_examples") else None)
    shown = [f for f in findings if f.severity != "info"]
    if shown:
        render_findings(console, shown, title="doctor")
    raise_for_errors(findings)


def absolute_paths(recipe: Recipe) -> None:
    """The saved recipe names data files and the reward model by absolute path, so eval/resume work from anywhere."""
    from tuneforge.recipe import resolve_path

    for source in recipe.data.sources("train") + recipe.data.sources("eval"):
        if isinstance(recipe.data.train, list) or isinstance(recipe.data.eval, list):
            resolved = resolve_path(recipe, source.path)
            if resolved and Path(resolved).exists():
                source.path = str(Path(resolved).resolve())
    for section, key in (("data", "train"), ("data", "eval"), ("rl", "reward_model")):
        value = getattr(getattr(recipe, section), key)
        if isinstance(value, list):
            continue
        resolved = resolve_path(recipe, value)
        if value and resolved and Path(resolved).exists():
            setattr(getattr(recipe, section), key, str(Path(resolved).resolve()))


# ---------------------------------------------------------------------------------------------------------------
# 2-6. set up, score, train, save, score


def _train_in(ctx: RunContext, checkpoint=None) -> RunDir:
    import torch
    from transformers import PrinterCallback, set_seed

    from tuneforge.adapters import describe_trainable, trainable_parameters
    from tuneforge.scores import forgetting_summary, held_out_losses, loss_delta, probe_after_training
    from tuneforge.scores import probe_before_training, scorer_for, token_weighted_loss

    run, recipe, spec, console, tokenizer = ctx.run, ctx.recipe, ctx.spec, ctx.console, ctx.tokenizer
    resumed = checkpoint is not None
    if not resumed:
        run.write_text("recipe.yaml", recipe_to_yaml(recipe))
        run.write_json("environment.json", environment())
        run.write_json("data_stats.json", ctx.data.stats.__dict__)
    else:  # drop metric rows logged after the checkpoint: they are logged again
        run.keep_metrics_through(int(checkpoint.name.split("-")[-1]))
    set_seed(recipe.train.seed)

    console.print(f"[bold]model[/] {recipe.model.name} on {ctx.device}")
    model, adapter_loaded = load_model(ctx)
    if hasattr(ctx.data, "train_examples") and spec.family != "reward":
        from tuneforge.evaluate.contamination import contamination_report, describe

        contamination = contamination_report(ctx.data.train_examples, ctx.data.eval_examples)
        run.write_json("eval/contamination.json", contamination)
        console.print(describe(contamination))

    # Before training: the method's scores of the base model, and the general-ability probe.
    scorer = scorer_for(ctx)
    scorer.before(model, resumed=resumed)
    generates = spec.family not in ("reward", "classification")  # a policy: the general probe applies
    probe_before = probe_before_training(ctx, model, resumed=resumed) if generates else None
    losses_before = held_out_losses(ctx, model, "base", resumed=resumed)
    model = apply_training_adapter(ctx, model, adapter_loaded)
    console.print(describe_trainable(model))
    trainable_params, total_params = trainable_parameters(model)
    from tuneforge.speed import prepare_model, prepare_trainer

    prepare_model(model, recipe)
    train_dataset, eval_dataset = method_datasets(ctx)
    scorer.start(model)

    trainer, numerical, interrupt, plateau = build_guarded_trainer(ctx, model, train_dataset, eval_dataset)
    prepare_trainer(trainer, recipe)
    measures_loss = spec.family in ("supervised", "preference", "distillation", "classification") \
        and eval_dataset is not None
    if not resumed:
        # Under FSDP2 accelerate must wrap the model together with the optimizer, which evaluate() before train()
        # would prevent; the base loss is then not measured (the tuned loss and the base generations still are).
        fsdp = getattr(trainer, "is_fsdp_enabled", False)
        if losses_before is not None:  # supervised: the per-example losses already give it (no second pass)
            base_loss = token_weighted_loss(losses_before)
            run.append_metrics({"step": 0, "epoch": 0, "time": 0.0, "eval_loss": base_loss})
        else:
            base_loss = trainer.evaluate()["eval_loss"] if measures_loss and not fsdp else None
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

    if plateau is not None:  # early stopping keeps the best weights, not the last
        best = plateau.restore_best(trainer, run.file("checkpoints"))
        if best is not None:
            console.print(f"[bold]early stopping[/] kept the best weights: step {plateau.best_step} "
                          f"({plateau.metric} {plateau.best_value:.4f}), from {best.name}")
    scorer.trained(trainer)
    policy = save_weights(ctx, trainer, model)
    losses_after = held_out_losses(ctx, policy, "tuned")
    if losses_after is not None:
        tuned_loss = token_weighted_loss(losses_after)
    else:
        tuned_loss = trainer.evaluate()["eval_loss"] if measures_loss else None
    if tuned_loss is not None:
        run.append_metrics({"step": trainer.state.global_step, "eval_loss": tuned_loss, "final": True})
    if plateau is not None:
        run.write_json("eval/early_stopping.json", plateau.summary(run.file("checkpoints")))

    scores = scorer.after(policy, trainer)
    forgetting = probe_after_training(ctx, policy, probe_before)
    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.state.global_step,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "eval_loss": {"base": base_loss, "tuned": tuned_loss,
                      **loss_delta(losses_before, losses_after)},
        "forgetting": forgetting_summary(forgetting),
        "skipped_nonfinite_steps": numerical.skipped,
        **({"distill": trainer.distill_summary} if hasattr(trainer, "distill_summary") else {}),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.device == "cuda" else None,
        **scores,
    }
    return finish_run(run, summary, console, table=scorer.table)


def load_model(ctx: RunContext):
    """(model, adapter_loaded): the base model (a reward model's one-output head for reward), EOS aligned with the
    chat template, and model.adapter loaded (continued, or merged so a fresh adapter goes on top)."""
    recipe, console = ctx.recipe, ctx.console
    if ctx.spec.hooks.get("load_model"):  # e.g. classify: a sequence-classification head
        return ctx.spec.hooks["load_model"](ctx), False
    if ctx.spec.family == "reward":
        from tuneforge.methods.reward import load_reward_base

        model = load_reward_base(recipe, ctx.device, console)
        model.config.pad_token_id = ctx.tokenizer.pad_token_id
        return model, False
    from tuneforge.data.template import align_eos
    from tuneforge.methods.common import load_start_adapter
    from tuneforge.models import load_base_model

    model = load_base_model(recipe.model, quant=recipe.quant if recipe.adapter.quantized else None,
                            device=ctx.device, attention=recipe.speed.attention)
    from tuneforge.vocab import match_vocabulary

    grown = match_vocabulary(model, ctx.tokenizer)  # model.add_tokens: new rows = the mean of the old ones
    if grown:
        console.print(f"[bold]embeddings[/] grew by {grown} rows (mean-initialised)")
    eos_ids = align_eos(ctx.tokenizer, model)
    console.print(f"generation stops at token ids {eos_ids} ({ctx.tokenizer.convert_ids_to_tokens(eos_ids)})")
    return load_start_adapter(model, recipe, console)  # model.adapter: e.g. the SFT stage's adapter


def apply_training_adapter(ctx: RunContext, model, adapter_loaded: bool):
    recipe = ctx.recipe
    if ctx.spec.family == "reward":
        from tuneforge.methods.reward import apply_reward_adapter

        return apply_reward_adapter(model, recipe, recipe.train.gradient_checkpointing)
    if ctx.spec.hooks.get("adapter"):
        return ctx.spec.hooks["adapter"](ctx, model)
    if adapter_loaded:
        return model
    from tuneforge.adapters import apply_adapter

    return apply_adapter(model, recipe, gradient_checkpointing=recipe.train.gradient_checkpointing,
                         tokenizer=ctx.tokenizer)


def method_datasets(ctx: RunContext):
    """(train, eval) datasets in the form the method's trainer takes."""
    recipe, data, method = ctx.recipe, ctx.data, ctx.recipe.method
    if ctx.spec.hooks.get("datasets"):
        return ctx.spec.hooks["datasets"](ctx)
    if ctx.spec.family == "preference":
        from tuneforge.methods.preference import preference_datasets

        return preference_datasets(recipe, data)
    if ctx.spec.family == "reward":
        from tuneforge.methods.reward import reward_pair_dataset

        return reward_pair_dataset(data.train_pairs), (reward_pair_dataset(data.eval_pairs) if data.eval_pairs else None)
    if ctx.spec.family == "distillation":
        from tuneforge.methods.gkd import conversation_dataset

        return conversation_dataset(data.train_examples), (conversation_dataset(data.eval_examples)
                                                           if data.eval_examples else None)
    if method == "ppo":
        from tuneforge.data.prompts import prompt_id_dataset

        limit = recipe.rl.max_prompt_length or max(8, recipe.train.max_length - recipe.rl.max_new_tokens)
        return prompt_id_dataset(data.train, ctx.tokenizer, limit), (prompt_id_dataset(data.eval, ctx.tokenizer, limit)
                                                                     if data.eval else None)
    if ctx.spec.data == "prompts":
        from tuneforge.data.prompts import prompt_dataset

        return prompt_dataset(data.train, ctx.tokenizer, data.columns), None
    from tuneforge.data.pipeline import to_dataset

    return to_dataset(data.train), (to_dataset(data.eval) if data.eval else None)


def build_guarded_trainer(ctx: RunContext, model, train_dataset, eval_dataset):
    """The method's trainer with the guards every run has: progress + metrics.jsonl, non-finite steps skipped
    (train.skip_nonfinite_batches), Ctrl-C, early stopping, atomic checkpoints, out-of-memory advice."""
    from transformers import PrinterCallback

    from tuneforge.checkpoints import install_checkpointing
    from tuneforge.guards import InterruptGuard, NumericalGuard, install_step_guards
    from tuneforge.progress import ProgressCallback

    recipe, run = ctx.recipe, ctx.run
    numerical = NumericalGuard(max_skips=recipe.train.skip_nonfinite_batches, run=run)
    interrupt = InterruptGuard()
    callbacks = [ProgressCallback(run, ctx.console), numerical, interrupt]
    from tuneforge.methods.common import tensorboard_callback

    tensorboard = tensorboard_callback(recipe, run)  # train.report_to: tensorboard -> <run>/tensorboard
    if tensorboard is not None:
        callbacks.append(tensorboard)
    if recipe.eval.forgetting_every:  # the general probe during training, not only before and after
        from tuneforge.mitigations import probe_callback

        callbacks.append(probe_callback(ctx, recipe.eval.forgetting_every))
    plateau = None
    if recipe.train.early_stopping is not None:
        from tuneforge.evaluate.early_stopping import PlateauStopping

        rule = recipe.train.early_stopping
        plateau = PlateauStopping(patience=rule.patience, min_delta=rule.min_delta, metric=rule.metric, save_best=True)
        callbacks.append(plateau)
    trainer = ctx.spec.build_trainer(ctx, model, train_dataset, eval_dataset, callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback shows and records them
    install_checkpointing(trainer, recipe, run, ctx.console)  # atomic saves; save_total_limit keeps the best; disk full
    install_step_guards(trainer, recipe, ctx.console)  # out of memory -> the step and the memory plan's advice
    from tuneforge.adapters import install_adapter_hooks

    install_adapter_hooks(trainer, recipe)  # AdaLoRA's budget step, LISA's layer switches, GaLore's targets
    return trainer, numerical, interrupt, plateau


def save_weights(ctx: RunContext, trainer, model):
    """adapter/ or model/ with tokenizer and generation config; returns the policy to score (PPO's policy inside its
    policy+value wrapper)."""
    run, tokenizer = ctx.run, ctx.tokenizer
    policy = getattr(trainer, "policy_for_eval", None) or trainer.model
    if hasattr(policy, "policy"):  # PPO's policy+value wrapper
        policy = policy.policy
    weights = run.file("adapter" if ctx.recipe.uses_peft else "model")
    if ctx.recipe.adapter.type == "bottleneck":  # tuneforge's own adapter: only its weights and config
        from tuneforge.artifacts import portable_base_name
        from tuneforge.bottleneck import save_bottlenecks

        if run.is_main:
            save_bottlenecks(trainer.model, weights, base_name=portable_base_name(ctx.recipe.model.name))
    else:
        trainer.save_model(str(weights))
    if run.is_main:  # under several processes only rank 0 writes (trainer.save_model already does so)
        if ctx.spec.family in ("rl", "reward", "distillation"):
            tokenizer.padding_side = "right"
        tokenizer.save_pretrained(str(weights))
        if ctx.spec.family not in ("reward", "classification"):
            (model if ctx.spec.family in ("supervised", "preference") else policy).generation_config.save_pretrained(
                str(weights))
        from tuneforge.artifacts import make_portable

        make_portable(weights, base_name=ctx.recipe.model.name)
    return policy if ctx.spec.family in ("rl", "distillation") else trainer.model


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


def print_summary(console, run: RunDir, summary: dict) -> None:
    from rich.table import Table

    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    from rich.markup import escape

    from tuneforge.evaluate.intervals import format_delta

    table = Table(title=f"{run.path.name}: held-out results ({summary['n_eval']} examples)",
                  caption="\\[brackets]: 95% interval of the difference over the same examples (paired bootstrap)")
    for column in ("", "base", "base few-shot", "tuned", "tuned - base", "tuned - few-shot"):
        table.add_column(column, justify="right")
    for name, values in summary["metrics"].items():
        base, few, tuned = values.get("base"), values.get("few_shot"), values.get("tuned")
        delta = f"{tuned - base:+.1f}" if base is not None and tuned is not None else ""
        versus = f"{tuned - few:+.1f}" if few is not None and tuned is not None else ""
        if values.get("tuned_vs_base"):
            delta = format_delta(values["tuned_vs_base"])
        if values.get("tuned_vs_few_shot"):
            versus = format_delta(values["tuned_vs_few_shot"])
        table.add_row(escape(name), cell(base), cell(few), cell(tuned), escape(delta), escape(versus))
    losses = summary["eval_loss"]
    if losses["tuned"] is not None:
        base = losses["base"]
        delta = f"{losses['tuned'] - base:+.4f}" if base is not None else ""
        if losses.get("ci95"):  # the delta and its interval from the same per-example losses
            delta = f"{losses['delta']:+.4f} [{losses['ci95'][0]:+.4f}, {losses['ci95'][1]:+.4f}]"
        table.add_row("eval loss", cell(base, 4), "", cell(losses["tuned"], 4), escape(delta), "")
    forgetting = summary.get("forgetting")
    if forgetting:
        acc = forgetting.get("accuracy", {})
        shown = format_delta(acc) if acc.get("ci95") else f"{acc.get('delta', 0):+.1f}"
        table.add_row("general probe %", cell(acc.get("before")), "", cell(acc.get("after")),
                      escape(shown) + (" [red]FLAG[/]" if forgetting["flagged"] else ""), "")
    console.print(table)
    if forgetting and forgetting["flagged"]:
        console.print(f"[bold red]forgetting:[/] {forgetting['message']}")
    console.print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s; run directory: {run.path}")
