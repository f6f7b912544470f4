"""A federated run's life, the same shape as every run's (train.py): check -> set up -> score before -> train ->
save -> score after -> report, with training done in rounds on Flower.

1. check   the recipe (checks.py: keys these runs cannot honour), the run directory, the model files, the data and
           its split into clients (split.py), doctor on the pooled records -- all before the run directory exists;
2. set up  tokenizer, the base model with the recipe's adapter (local.Workbench), the speed levers; the fresh
           adapter is round 0 (checkpoints/round-0);
3. score   round 0: the base model on the global held-out set (eval.baseline), with the few-shot prompt (eval.few_shot)
           and the general-ability probe (eval.forgetting);
4. train   federated.rounds rounds on Flower's simulation engine (flower.py): the sampled clients train the global
           adapter on their own records, the strategy aggregates; then every client scores it on its own held-out
           records and the server on the global held-out set, and the round is checkpointed;
           then the baselines (federated.baselines): the same budget trained centrally on the pooled records, and
           each client alone;
5. save    adapter/: the global adapter, an ordinary adapter folder;
6. report  summary.json (per-round scores, the comparison, privacy, traffic), plots/, report.html, the terminal.

`tuneforge train --resume RUN` restarts at the first round not checkpointed, and skips finished baselines.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from tuneforge.federated import rounds as R


@contextmanager
def failed_on_error(run, writing: threading.Lock):
    """A federated run's life (either engine): any error marks status.json failed -- under the round writer's lock,
    so a round being written finishes first -- and the run's lock is released however it ends."""
    from tuneforge.run import release_run

    try:
        yield
    except BaseException as exc:
        with writing:
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    finally:
        release_run(run)


def train_federated(recipe, *, pieces, output=None, overwrite=False, console=None, resume=False, doctor=True):
    """`pieces`: train.py's functions (federated.pieces)."""
    from rich.console import Console

    console = console or Console()
    if recipe.federated.mode == "per_tenant":
        from tuneforge.federated.tenants import train_tenants

        return train_tenants(recipe, pieces, output=output, overwrite=overwrite, console=console, resume=resume,
                             doctor=doctor)
    return FederatedRun(recipe, pieces, console).run(output=output, overwrite=overwrite, resume=resume, doctor=doctor)


def prepare(recipe, pieces, console, *, resume: bool, doctor: bool):
    """Steps 1-2 shared with per-tenant runs: checks, split, speed levers, doctor, the Workbench. Returns the resolved
    recipe (absolute paths, clients counted), the split and the Workbench; nothing is written."""
    from tuneforge.data.prepared import DataStats, PreparedData
    from tuneforge.federated.checks import check_recipe
    from tuneforge.federated.local import Workbench
    from tuneforge.federated.split import split_recipe_data
    from tuneforge.methods.common import check_trackers
    from tuneforge.models import check_weight_files, load_tokenizer, quiet_transformers
    from tuneforge.speed import resolve_for_run

    check_recipe(recipe)
    check_trackers(recipe)
    quiet_transformers()
    check_weight_files(recipe.model.name, allow_pickle=recipe.model.allow_pickle)
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
    split = split_recipe_data(recipe)
    from tuneforge.data.pipeline import tokenize_all

    pooled = [e for s in split.shards for e in s.train]
    tokenized, truncated, dropped = tokenize_all(tokenizer, pooled, recipe.train.max_length)
    base_dir = recipe.source_dir
    recipe = resolve_for_run(recipe, console, [len(t.input_ids) for t in tokenized] or None)
    if doctor and not resume:
        held_out = tokenize_all(tokenizer, split.global_held_out, recipe.train.max_length)[0]
        stats = DataStats(format=split.detected_format, train_examples=len(tokenized), truncated=truncated,
                          dropped_no_loss=dropped, max_length=recipe.train.max_length, eval_examples=len(held_out))
        pieces.run_doctor(recipe, tokenizer, PreparedData(tokenized, held_out, pooled, split.global_held_out, stats),
                          console)
    pieces.absolute_paths(recipe)
    if recipe.federated.split_field:
        recipe.federated.clients = len(split.shards)  # the saved recipe records the count the field gave
    from transformers import set_seed

    set_seed(recipe.train.seed)  # the fresh adapter's initialisation
    bench = Workbench(recipe, pieces, console, base_dir=str(base_dir) if base_dir else None)
    return recipe, split, bench, str(base_dir) if base_dir else None


def open_run_directory(recipe, output, *, overwrite: bool, resume: bool, console):
    """The run directory: a fresh one (checked before any work), or the unfinished run to resume, locked."""
    from tuneforge.run import RunDir, check_output_path, refuse_if_in_use, run_path_for

    path = run_path_for(recipe, output)
    if resume:
        refuse_if_in_use(path, "train --resume")
        if (RunDir(path).read_json("environment.json", {}) or {}).get("engine") == "deployment":
            from tuneforge.errors import RunDirError

            raise RunDirError(f"{path} was trained on Flower's deployment engine (tuneforge federated app); "
                              "tuneforge train --resume would continue it on the simulation engine with pooled "
                              "records", fix="start a new run: tuneforge federated app RECIPE --output APP_DIR "
                              "--run-dir NEW_RUN_DIR, then flwr run APP_DIR tuneforge")
        last = R.resume_point(RunDir(path), recipe.federated.rounds)
        return path, last
    check_output_path(path, overwrite=overwrite)
    return path, None


class FederatedRun:
    def __init__(self, recipe, pieces, console):
        self.recipe, self.pieces, self.console = recipe, pieces, console
        self.history: list[dict] = []
        self.last_time = None
        self.final_samples = None
        self.traffic_before: dict = {}
        self.server_job = None
        self.writing = threading.Lock()  # the ServerApp thread's round record vs the main thread's stop

    # -- the life ---------------------------------------------------------------------------------------------------
    def run(self, *, output, overwrite, resume, doctor):
        from tuneforge.recipe import recipe_to_yaml
        from tuneforge.run import RunDir, acquire_run_lock, environment

        path, last = open_run_directory(self.recipe, output, overwrite=overwrite, resume=resume, console=self.console)
        recipe, split, bench, base_dir = prepare(self.recipe, self.pieces, self.console, resume=resume, doctor=doctor)
        self.recipe, self.split, self.bench, self.base_dir = recipe, split, bench, base_dir
        self.fed = recipe.federated
        from tuneforge.federated.report import print_split

        print_split(self.console, split, self.fed)
        run = RunDir(path)
        if resume:
            acquire_run_lock(run.path, doing="train --resume")
            R.clear_partial(run)
            run.set_status("running", resumed_from_round=last)
            self.console.print(f"[bold]resuming[/] {path} after round {last} of {self.fed.rounds}")
        else:
            run.create(overwrite=overwrite, console=self.console)
            run.write_text("recipe.yaml", recipe_to_yaml(recipe))
            run.write_json("environment.json", {**environment(), "flwr": _version("flwr"), "ray": _version("ray")})
            run.write_json("data_stats.json", split.describe())
            run.write_json("eval/clients.json", split.describe())
        self.run_dir = run
        with failed_on_error(run, self.writing):
            try:
                return self._life(run, last or 0, resume)
            except KeyboardInterrupt:
                with self.writing:  # Flower's thread has been told to stop (simulate); a round being written finishes
                    done = R.completed_rounds(run)
                    run.set_status("interrupted", finished=time.time(), last_round=done[-1] if done else None)
                self.console.print(f"[yellow]stopped; rounds checkpointed: {done or 'none'}.[/] Continue with: "
                                   f"tuneforge train --resume {run.path}")
                return run

    def _life(self, run, last: int, resumed: bool):
        from tuneforge.federated.flower import ClientJob, ServerJob, simulate
        from tuneforge.federated.privacy import privacy_record

        started = time.time()
        recipe, fed, bench, split = self.recipe, self.fed, self.bench, self.split
        self.metric, self.higher = R.primary_metric(recipe, bench.spec)
        self.global_tok = bench.tokenize(split.global_held_out)
        if resumed and R.completed_rounds(run):
            initial, self.history = R.load_round(run, 0, order=list(bench.initial))
            state, self.history = R.load_round(run, last, order=list(bench.initial))
            R.keep_rows_through(run, last, set((run.read_json("eval/baselines.json", {}) or {})))
        else:
            initial = state = bench.initial
            self.history = []
            if resumed:  # stopped before round 0 was checkpointed: start over in the same run directory
                run.write_text("metrics.jsonl", "")
        self.initial = initial
        sampled = max(1, int(len(split.shards) * fed.fraction))
        seed = fed.seed if fed.seed is not None else recipe.train.seed
        self.traffic_before = (run.read_json("status.json", {}) or {}).get("traffic", {}) if resumed else {}
        self.server_job = ServerJob(
            clients=len(split.shards), rounds_left=fed.rounds - last, round_offset=last, fraction=fed.fraction,
            aggregation=fed.aggregation, proximal_mu=fed.proximal_mu, privacy=fed.privacy, seed=seed + last,
            initial=state, on_round=self.on_round, adapter_names=set(bench.initial))
        if last < fed.rounds:
            client = ClientJob(recipe=recipe.model_dump(mode="json"), pieces=self.pieces, base_dir=self.base_dir,
                               metrics_path=str(run.file("metrics.jsonl")), local_steps=fed.local_steps,
                               local_epochs=fed.local_epochs, seed=recipe.train.seed,
                               clipping=fed.privacy.clipping if fed.privacy is not None else None)
            self.last_time = time.time()
            self.console.print(f"[bold]federated[/] {fed.rounds - last} round(s) on Flower's simulation engine, "
                               f"{len(split.shards)} clients ({sampled} per round), {fed.aggregation}")
            simulate(client, self.server_job, device=bench.device)
        traffic = self.traffic()
        final, _ = R.load_round(run, fed.rounds, order=list(bench.initial))
        if self.final_samples is not None:
            run.write_json("eval/tuned.json", self.final_samples)
        train_seconds = time.time() - started
        from tuneforge.federated.baselines import run_baselines

        budget = R.budgets(fed, recipe, [len(bench.tokenize(s.train)) for s in split.shards], sampled)
        baselines = run_baselines(self, run, budget) if fed.baselines else {}
        weights = run.file("adapter")
        bench.save(final, weights)
        forgetting = self.forgetting(run, final)
        summary = self.summary(final, budget, baselines, traffic, train_seconds, privacy_record(fed, sampled),
                               forgetting)
        return self.finish(run, summary)

    # -- one round done (Flower's evaluate_fn, in the ServerApp's thread) -------------------------------------------
    def on_round(self, number: int, arrays):
        bench, recipe, run = self.bench, self.recipe, self.run_dir
        if self.history and self.history[-1]["round"] >= number:
            return None  # a resumed run: this round was scored before it was checkpointed
        state = arrays.to_torch_state_dict() if arrays is not None else bench.initial
        job = self.server_job
        if number == 0:
            result = self.score_base(state) if recipe.eval.baseline else None
            entry = R.round_entry(0, result, {}, {}, self.metric, None)
        else:
            result = bench.score(state, self.split.global_held_out, self.global_tok, label=f"global, round {number}")
            clients = {k: R.client_result(v) for k, v in job.eval_replies.items()}
            trained = {k: R.train_result(v) for k, v in job.train_replies.items()}
            now = time.time()
            entry = R.round_entry(number, result, clients, trained, self.metric, now - self.last_time)
            self.last_time = now
        samples = (entry.get("global") or {}).pop("samples", None)
        if samples is not None:
            self.final_samples = {**entry["global"], "samples": samples}
        row = {"round": number, f"global_{self.metric}": R.score_of(result, self.metric)}
        if result and result.get("eval_loss") is not None:
            row["global_eval_loss"] = result["eval_loss"]
        with self.writing:  # not while the main thread records a stop (Ctrl-C) and releases the run
            if job is not None and job.stop.is_set():
                from tuneforge.federated.flower import RunStopped

                raise RunStopped("the run is stopping; this round is not recorded")
            self.history.append(entry)
            R.write_round(run, number, state, self.history)
            run.set_status("running", traffic=self.traffic(), last_round=number)
            run.append_metrics(row)
        from tuneforge.federated.report import print_round, tensorboard_scalars

        print_round(self.console, entry, self.metric, self.fed.rounds)
        tensorboard_scalars(run, recipe, number, entry, self.metric)
        from flwr.app import MetricRecord

        value = R.score_of(result, self.metric)
        return MetricRecord({self.metric: float(value)}) if value is not None else None

    def traffic(self) -> dict:
        """Messages and bytes each way so far (a resumed run adds its rounds to the earlier ones)."""
        now = self.server_job.traffic if self.server_job is not None else {}
        return {k: self.traffic_before.get(k, 0) + now.get(k, 0) for k in set(self.traffic_before) | set(now)}

    def score_base(self, state: dict) -> dict:
        """Round 0: the base model (the fresh adapter changes nothing) on the global held-out set, and the few-shot
        prompt baseline built from pooled training records (a reference figure: no federated server holds them)."""
        bench, recipe = self.bench, self.recipe
        result = bench.score(state, self.split.global_held_out, self.global_tok, label="base model")
        if recipe.eval.few_shot and bench.spec.hooks.get("few_shot") and result.get("metrics"):
            from tuneforge.evaluate.baselines import few_shot_examples

            pooled = [e for s in self.split.shards for e in s.train]
            shots = few_shot_examples(self.split.global_held_out, pooled, k=recipe.eval.few_shot,
                                      seed=recipe.train.seed, as_text=not bench.tokenizer.chat_template)
            result["few_shot"] = bench.score(state, shots, [], label="base model, few-shot")["metrics"]
        return result

    def forgetting(self, run, final: dict):
        """eval.forgetting: the general-ability probe on the base model and on the global adapter."""
        if not self.recipe.eval.forgetting:
            return None
        from tuneforge.evaluate.forgetting import compare, run_probe

        bench = self.bench
        bench.load_state(self.initial)
        before = run_probe(bench.model, bench.tokenizer)
        bench.load_state(final)
        after = run_probe(bench.model, bench.tokenizer)
        comparison = compare(before, after, threshold=self.recipe.eval.forgetting_threshold)
        run.write_json("eval/forgetting.json", {"before": before, "after": after, "comparison": comparison})
        from tuneforge.scores import forgetting_summary

        return forgetting_summary(comparison)

    # -- summary and report -----------------------------------------------------------------------------------------
    def summary(self, final, budget, baselines, traffic, train_seconds, privacy, forgetting) -> dict:
        from tuneforge.adapters import trainable_parameters
        from tuneforge.federated.baselines import comparison

        base = self.history[0]["global"] if self.history and self.history[0]["round"] == 0 else None
        tuned = self.history[-1]["global"]
        names = sorted(set((tuned or {}).get("metrics", {})) | set((base or {}).get("metrics", {})))
        metrics = {n: {"base": (base or {}).get("metrics", {}).get(n),
                       "few_shot": ((base or {}).get("few_shot") or {}).get(n),
                       "tuned": (tuned or {}).get("metrics", {}).get(n)} for n in names}
        trainable, total = trainable_parameters(self.bench.model)
        steps = sum(t.get("steps", 0) for e in self.history for t in e.get("trained", {}).values())
        fed = self.fed
        return {
            "mode": "federated", "train_seconds": round(train_seconds, 1), "steps": steps,
            "trainable_params": trainable, "total_params": total,
            "metrics": metrics,
            "eval_loss": {"base": (base or {}).get("eval_loss"), "tuned": (tuned or {}).get("eval_loss")},
            "n_eval": (tuned or {}).get("n", 0), "forgetting": forgetting, "primary_metric": self.metric,
            "adapters": [{"name": "global", "path": "adapter"}],
            "federated": {
                "engine": f"flwr {_version('flwr')} simulation (run_simulation, Ray backend)",
                "clients": len(self.split.shards), "rounds": fed.rounds, "fraction": fed.fraction,
                "aggregation": fed.aggregation, "proximal_mu": fed.proximal_mu, "split": self.split.describe(),
                "local_steps": fed.local_steps, "local_epochs": fed.local_epochs, "budget": budget,
                "rounds_history": self.history, "baselines": baselines,
                "comparison": comparison(self, baselines), "privacy": privacy, "traffic": traffic,
                "crossed_boundary": "adapter tensors (ArrayRecord named as the adapter's tensors) and numbers "
                                    "(ConfigRecord / MetricRecord); checked on every message",
            },
        }

    def finish(self, run, summary: dict):
        from tuneforge.federated.report import print_summary, write_federated_report

        run.write_json("summary.json", summary)
        run.set_status("completed", finished=time.time())
        report = write_federated_report(run.path)
        print_summary(self.console, run, summary)
        self.console.print(f"report: {report}")
        return run


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
