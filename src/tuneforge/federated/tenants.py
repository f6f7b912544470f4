"""Per-tenant adapters (federated.mode: per_tenant): one recipe, one LoRA adapter per tenant on the shared base.

The field named by `split: field:<name>` says which tenant each record belongs to. Each tenant's records are split
into its training and held-out sets (data.eval_fraction, by content hash); its adapter trains from the same fresh
adapter for train.max_steps / train.epochs on its records only, and is scored before and after on its own held-out
records. Each adapter is an ordinary adapter folder, adapter/<tenant>/ (written whole, then renamed into place), and
summary.json lists them all under "adapters" ({name, path}) for `tuneforge serve`. A resumed run keeps the tenants
already finished (eval/tenants.json) and trains the rest.
"""

from __future__ import annotations

import shutil
import time


def train_tenants(recipe, pieces, *, output=None, overwrite=False, console=None, resume=False, doctor=True):
    from tuneforge.errors import RunDirError
    from tuneforge.federated.report import print_split, write_federated_report
    from tuneforge.federated.run import open_run_directory, prepare
    from tuneforge.federated.split import tenant_folders
    from tuneforge.recipe import recipe_to_yaml
    from tuneforge.run import RunDir, acquire_run_lock, environment, release_run

    if resume:
        from tuneforge.run import refuse_if_in_use, run_path_for

        path = run_path_for(recipe, output)
        refuse_if_in_use(path, "train --resume")
        existing = RunDir(path)
        if not existing.file("recipe.yaml").is_file():
            raise RunDirError(f"{path} is not a tuneforge run directory (no recipe.yaml)", fix="pass the run directory")
        if existing.status == "completed":
            raise RunDirError(f"run {path} already completed; nothing to resume", fix="train a new run (--output)")
    else:
        path, _ = open_run_directory(recipe, output, overwrite=overwrite, resume=False, console=console)
    recipe, split, bench, _base_dir = prepare(recipe, pieces, console, resume=resume, doctor=doctor)
    print_split(console, split, recipe.federated)
    folders = tenant_folders([s.name for s in split.shards])
    run = RunDir(path)
    if resume:
        acquire_run_lock(run.path, doing="train --resume")
        run.set_status("running", resumed=True)
    else:
        run.create(overwrite=overwrite, console=console)
        run.write_text("recipe.yaml", recipe_to_yaml(recipe))
        run.write_json("environment.json", environment())
        run.write_json("data_stats.json", split.describe())
        run.write_json("eval/clients.json", split.describe())
    try:
        return _train_all(run, recipe, split, bench, folders, console, write_federated_report)
    except KeyboardInterrupt:
        run.set_status("interrupted", finished=time.time())
        console.print(f"[yellow]stopped.[/] Continue with: tuneforge train --resume {run.path}")
        return run
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    finally:
        release_run(run)


def _train_all(run, recipe, split, bench, folders, console, write_report):
    from tuneforge.federated.rounds import primary_metric, score_of

    started = time.time()
    done = run.read_json("eval/tenants.json", {}) or {}
    saved = {k for k in done if (run.file("adapter") / folders.get(k, "\0") / "adapter_config.json").is_file()}
    done = {k: v for k, v in done.items() if k in saved}
    metric, _higher = primary_metric(recipe, bench.spec)
    for shard in split.shards:
        if shard.name in done:
            console.print(f"[bold]tenant {shard.name}[/]: finished before, kept")
            continue
        train_tok, held_tok = bench.tokenize(shard.train), bench.tokenize(shard.held_out)
        console.print(f"[bold]tenant {shard.name}[/]: {len(train_tok)} training records, {len(held_tok)} held out")
        base = (bench.score(bench.initial, shard.held_out, held_tok, label=f"{shard.name}, base")
                if recipe.eval.baseline else None)
        result = bench.train(bench.initial, train_tok, steps=recipe.train.max_steps, epochs=recipe.train.epochs,
                             seed=recipe.train.seed, sink=run.append_metrics, tags={"tenant": shard.name},
                             console=console)
        tuned = bench.score(result.state, shard.held_out, held_tok, label=f"{shard.name}, tuned")
        folder = run.file("adapter") / folders[shard.name]
        staging = run.file("adapter") / f".tmp-{folders[shard.name]}"
        shutil.rmtree(staging, ignore_errors=True)
        bench.save(result.state, staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        names = sorted(set((tuned or {}).get("metrics", {})) | set((base or {}).get("metrics", {})))
        done[shard.name] = {
            "name": shard.name, "adapter": f"adapter/{folders[shard.name]}", "train": len(train_tok),
            "held_out": len(held_tok), "steps": result.steps, "train_loss": result.train_loss,
            "metrics": {n: {"base": (base or {}).get("metrics", {}).get(n), "tuned": tuned["metrics"].get(n)}
                        for n in names},
            "eval_loss": {"base": (base or {}).get("eval_loss"), "tuned": tuned.get("eval_loss")},
            "samples": tuned.get("samples", [])[:3]}
        run.write_json("eval/tenants.json", done)
        value = score_of(tuned, metric)
        console.print(f"  {shard.name}: {metric} " + ("-" if value is None else f"{value:.4g}")
                      + f" (base {score_of(base, metric) if base else '-'})")
    tenants = [done[s.name] for s in split.shards]
    summary = {
        "mode": "per_tenant", "tenant_field": recipe.federated.split_field,
        "train_seconds": round(time.time() - started, 1),
        "steps": sum(t["steps"] for t in tenants), "primary_metric": metric,
        "metrics": _mean_metrics(tenants), "eval_loss": _mean_losses(tenants),
        "n_eval": sum(t["held_out"] for t in tenants), "tenants": tenants,
        "adapters": [{"name": t["name"], "path": t["adapter"]} for t in tenants],
        "federated": {"engine": "none: each tenant trains alone (no aggregation)", "split": split.describe()},
    }
    run.write_json("summary.json", summary)
    run.set_status("completed", finished=time.time())
    report = write_report(run.path)
    console.print(f"{len(tenants)} tenant adapters under {run.file('adapter')}; report: {report}")
    return run


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_metrics(tenants: list[dict]) -> dict:
    """The average over tenants of each metric (each tenant scored on its own held-out records)."""
    names = sorted({n for t in tenants for n in t["metrics"]})
    return {n: {k: _mean([t["metrics"].get(n, {}).get(k) for t in tenants]) for k in ("base", "tuned")} for n in names}


def _mean_losses(tenants: list[dict]) -> dict:
    return {k: _mean([t["eval_loss"].get(k) for t in tenants]) for k in ("base", "tuned")}
