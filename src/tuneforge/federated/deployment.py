"""Flower's deployment engine: a federated recipe trained by real processes on separate machines -- a
`flower-superlink` on the server, one `flower-supernode` per client machine, and `flwr run APP_DIR CONNECTION`, with
the Flower App folder written by `tuneforge federated app` (app.py).

The App names the two module-level objects below. Flower starts a `flwr-serverapp` process for `server_app` on the
SuperLink's machine and a `flwr-clientapp` process for `client_app` on a SuperNode's machine for each message. Both
read the recipe (its YAML text) and the run directory from the App's run config:

  client_app  reads the client's OWN records, from the paths in its SuperNode's --node-config
              (`train='/path/records.jsonl'`, optional `eval='/path/held-out.jsonl'`; without eval, data.eval_fraction
              of its records by content hash); no shard of a pooled file, no other client's records
  server_app  holds only the global held-out set (the recipe's data.eval): scores the global adapter every round,
              writes the run directory (round checkpoints, adapter/, summary.json, report.html). There is no pooled
              training data on the server, so the central and client-alone baselines are not run (summary.json and
              the report say so).

The messages, the wire check, the strategies and the DP wrappers are the simulation's (flower.py), unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import DataError, RecipeError, TuneforgeError
from tuneforge.federated import rounds as R
from tuneforge.federated.run import FederatedRun

NODE_KEYS = {"train": "the client's own training records (a .jsonl / .json / .csv / .parquet file on its machine)",
             "eval": "optional: the client's own held-out records (default: data.eval_fraction of its train file)"}
NODE_EXAMPLE = "--node-config \"train='/data/my-records.jsonl'\""
NO_BASELINES = ("not run on Flower's deployment engine: the server holds only the global held-out set (data.eval), "
                "never the clients' training records, so neither central training on pooled records nor each client "
                "alone can be trained there")


class NodeConfigError(TuneforgeError):
    """A SuperNode's --node-config lacks what a tuneforge client needs, or names a file that is not there."""


@dataclass(frozen=True)
class NodeData:
    train: Path
    eval: Path | None


def parse_node_config(node_config: dict) -> NodeData:
    """The client's own files from its SuperNode's --node-config; errors name the key and the flag to fix."""
    where = "flower-supernode --node-config"
    config = dict(node_config or {})
    unknown = sorted(k for k in config if k not in NODE_KEYS and k != "partition-id" and k != "num-partitions")
    if unknown:
        raise NodeConfigError(f"unknown key {unknown[0]!r}; a tuneforge client reads "
                              + "; ".join(f"{k}: {v}" for k, v in NODE_KEYS.items()), where=where,
                              fix=f"start the SuperNode with {NODE_EXAMPLE} (and eval='...' for its own held-out file)")
    if "train" not in config:
        raise NodeConfigError("has no 'train' key: the path of this client's own training records", where=where,
                              fix=f"start the SuperNode with {NODE_EXAMPLE}")
    paths = {}
    for key in ("train", "eval"):
        if key not in config:
            continue
        value = config[key]
        if not isinstance(value, str) or not value.strip():
            raise NodeConfigError(f"{key} must be a file path in quotes (got {value!r})", where=where,
                                  fix=f"quote the path: {key}='/path/to/file.jsonl'")
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise NodeConfigError(f"{key}={value!r} is a relative path; the ClientApp runs in a process Flower starts "
                                  "elsewhere, so relative paths are ambiguous", where=where,
                                  fix=f"give the absolute path: {key}='{Path(value).resolve()}'")
        if not path.is_file():
            raise NodeConfigError(f"{key}: the records file {path} does not exist on this machine", where=where,
                                  fix=f"copy the client's records to {path}, or restart the SuperNode with the right "
                                  f"{key}='...' path")
        paths[key] = path
    return NodeData(paths["train"], paths.get("eval"))


# ---------------------------------------------------------------------------------------------------------------
# The run config (written by app.py)


def recipe_from_run_config(run_config: dict):
    """The recipe the App carries (its YAML text, every path absolute), validated."""
    from tuneforge.recipe import parse_recipe
    from tuneforge.recipe_yaml import load_yaml_bounded

    text = run_config.get("recipe")
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(["the Flower App's run config has no `recipe` (its YAML text); write the App with "
                           "tuneforge federated app RECIPE --output APP_DIR"])
    return parse_recipe(load_yaml_bounded(text, "the App's recipe"), source="the App's recipe", text=text)


def _pieces():
    import tuneforge.train as life
    from tuneforge.federated.pieces import Pieces

    return Pieces.from_life(life)


# ---------------------------------------------------------------------------------------------------------------
# The client: its own records


_OWN: dict = {}


def own_records(job, context):
    """(0, shard, tokenized training, tokenized held-out) of this SuperNode's own files (ClientJob.records). The
    server numbers the clients (flower.AuditedGrid); the 0 is replaced there."""
    import json

    from tuneforge.data.pipeline import load_examples
    from tuneforge.data.splits import dedup, example_hash, hash_split
    from tuneforge.federated.local import workbench_for
    from tuneforge.federated.split import Shard, read_with_groups
    from tuneforge.methods import method_spec
    from tuneforge.recipe import Recipe

    node = parse_node_config(context.node_config)
    key = (json.dumps(job.recipe, sort_keys=True), str(node.train), str(node.eval))
    if key in _OWN:
        return _OWN[key]
    recipe = Recipe.model_validate(job.recipe)
    data = recipe.data
    kind = method_spec(recipe.method).data
    fmt = "text" if kind == "text" and data.format == "auto" else data.format
    examples, _, detected = read_with_groups(str(node.train), fmt, None, split=data.split, limit=data.max_examples,
                                             system_prompt=data.system_prompt)
    if kind == "conversations" and detected == "text":
        raise DataError(f"method {recipe.method} needs prompts and answers, but {node.train} is plain text",
                        where="flower-supernode --node-config train", fix="give messages / prompt+completion records")
    if data.dedup:
        examples, _ = dedup(examples, key=example_hash)
    if node.eval is not None:
        train = examples
        held, _ = load_examples(str(node.eval), detected, split="test", system_prompt=data.system_prompt)
    else:
        train, held = hash_split(examples, data.eval_fraction)
    if not train or not held:
        raise DataError(f"{node.train}: {len(train)} training and {len(held)} held-out record(s); a client needs at "
                        "least one of each", where="flower-supernode --node-config",
                        fix="add records, or give the client's held-out records with eval='/path/held-out.jsonl'")
    bench = workbench_for(job.recipe, job.pieces, job.base_dir)
    shard = Shard(0, node.train.stem, train, held)
    _OWN.clear()
    _OWN[key] = (0, shard, bench.tokenize(train), bench.tokenize(held))
    return _OWN[key]


_CLIENT_APPS: dict = {}


def _client_for(context):
    """The ClientApp of flower.py for the recipe in the run config (built once per process)."""
    text = context.run_config.get("recipe", "")
    if text not in _CLIENT_APPS:
        from tuneforge.federated.checks import check_recipe
        from tuneforge.federated.flower import ClientJob, build_client_app

        from rich.console import Console

        from tuneforge.speed import resolve_for_run

        recipe = recipe_from_run_config(context.run_config)
        check_deployable(recipe)
        check_recipe(recipe)
        recipe = resolve_for_run(recipe, Console(quiet=True), None)  # speed levers `auto` decided for this machine
        fed = recipe.federated
        job = ClientJob(recipe=recipe.model_dump(mode="json"), pieces=_pieces(), base_dir=None, metrics_path=None,
                        local_steps=fed.local_steps, local_epochs=fed.local_epochs, seed=recipe.train.seed,
                        clipping=fed.privacy.clipping if fed.privacy is not None else None, records=own_records)
        _CLIENT_APPS.clear()
        _CLIENT_APPS[text] = build_client_app(job)
    return _CLIENT_APPS[text]


def _make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        parse_node_config(context.node_config)  # a bad --node-config is named before the model loads
        return _client_for(context)(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        parse_node_config(context.node_config)
        return _client_for(context)(msg, context)

    return app


# ---------------------------------------------------------------------------------------------------------------
# The server: the global held-out set only


def check_deployable(recipe) -> None:
    """What the deployment engine needs of a recipe beyond federated/checks.py."""
    fed = recipe.federated
    if fed is None:
        raise RecipeError(["`federated`: the recipe has no federated: section; add one (e.g. federated: {rounds: 3, "
                           "clients: 2}) -- see docs/federated.md"], source=recipe.source_path)
    problems = []
    if fed.mode != "federated":
        problems.append("`federated.mode`: per_tenant runs train each tenant on one machine (tuneforge train); "
                        "Flower's deployment engine runs mode: federated only")
    if fed.clients is None:
        problems.append("`federated.clients`: set it to the number of SuperNodes the server waits for (with "
                        f"split: {fed.split} it would be counted from the pooled records, which the server never sees)")
    if not recipe.data.eval or isinstance(recipe.data.eval, list):
        problems.append("`data.eval`: the server holds only the global held-out set and scores every round on it: "
                        "give data.eval (one file on the server's machine)")
    if problems:
        raise RecipeError(problems, source=recipe.source_path)


class DeployedRun(FederatedRun):
    """A federated run whose clients are SuperNodes on other machines: the same round record, scoring, checkpoints,
    summary and report as FederatedRun; no split, no pooled records, no baselines."""

    def run_on(self, grid, output: str):
        from tuneforge.recipe import recipe_to_yaml
        from tuneforge.run import RunDir, check_output_path, environment

        path = Path(output)
        check_output_path(path, overwrite=False)
        recipe, self.split, self.bench = self._prepare()
        self.recipe, self.fed, self.base_dir = recipe, recipe.federated, None
        run = RunDir(path)
        run.create(overwrite=False, console=self.console)
        run.write_text("recipe.yaml", recipe_to_yaml(recipe))
        from tuneforge.federated.run import _version

        run.write_json("environment.json", {**environment(), "flwr": _version("flwr"), "engine": "deployment"})
        self.run_dir = run
        from tuneforge.federated.run import failed_on_error

        with failed_on_error(run, self.writing):
            return self._serve(run, grid)

    def _prepare(self):
        from tuneforge.data.pipeline import load_examples
        from tuneforge.data.splits import dedup
        from tuneforge.federated.checks import check_recipe
        from tuneforge.federated.local import Workbench
        from tuneforge.federated.split import Split
        from tuneforge.methods.common import check_trackers
        from tuneforge.models import check_weight_files, quiet_transformers
        from tuneforge.recipe import resolve_path
        from tuneforge.speed import resolve_for_run

        recipe = self.recipe
        check_deployable(recipe)
        check_recipe(recipe)
        check_trackers(recipe)
        quiet_transformers()
        check_weight_files(recipe.model.name, allow_pickle=recipe.model.allow_pickle)
        path = resolve_path(recipe, recipe.data.eval)
        if not Path(path).is_file():
            raise DataError(f"the global held-out set {path} does not exist on the server's machine", where="data.eval",
                            fix="put the global held-out records there, or write the App again with data.eval set")
        held, detected = load_examples(path, recipe.data.format, split="test", system_prompt=recipe.data.system_prompt)
        if recipe.data.dedup:
            held, _ = dedup(held)
        recipe = resolve_for_run(recipe, self.console, None)
        from transformers import set_seed

        set_seed(recipe.train.seed)  # the fresh adapter's initialisation
        bench = Workbench(recipe, self.pieces, self.console)
        return recipe, Split([], held, detected, 0, "data.eval"), bench

    def _serve(self, run, grid):
        from tuneforge.federated.flower import ServerJob, serve
        from tuneforge.federated.privacy import privacy_record

        started = time.time()
        recipe, fed, bench = self.recipe, self.fed, self.bench
        self.metric, self.higher = R.primary_metric(recipe, bench.spec)
        self.global_tok = bench.tokenize(self.split.global_held_out)
        self.initial = bench.initial
        sampled = max(1, int(fed.clients * fed.fraction))
        seed = fed.seed if fed.seed is not None else recipe.train.seed
        self.server_job = ServerJob(
            clients=fed.clients, rounds_left=fed.rounds, round_offset=0, fraction=fed.fraction,
            aggregation=fed.aggregation, proximal_mu=fed.proximal_mu, privacy=fed.privacy, seed=seed,
            initial=bench.initial, on_round=self.on_round, adapter_names=set(bench.initial))
        self.last_time = time.time()
        self.console.print(f"[bold]federated[/] {fed.rounds} round(s) on Flower's deployment engine: waiting for "
                           f"{fed.clients} SuperNodes ({sampled} per round), {fed.aggregation}")
        serve(self.server_job, grid, number_nodes=True)
        final, _ = R.load_round(run, fed.rounds, order=list(bench.initial))
        if self.final_samples is not None:
            run.write_json("eval/tuned.json", self.final_samples)
        clients = self.clients_seen()
        run.write_json("eval/clients.json", clients)
        run.write_json("data_stats.json", clients)
        bench.save(final, run.file("adapter"))
        forgetting = self.forgetting(run, final)
        summary = self.summary(final, None, {}, self.traffic(), time.time() - started, privacy_record(fed, sampled),
                               forgetting)
        block = summary["federated"]
        block.update(engine=f"flwr {_flwr()} deployment (flower-superlink, flower-supernode, flwr run)",
                     clients=fed.clients, split=clients, baselines={}, baselines_not_run=NO_BASELINES,
                     records="each client trained on the records file named in its own SuperNode's --node-config; "
                             "federated.split / group_by / alpha and data.train are not used by this engine")
        return self.finish(run, summary)

    def clients_seen(self) -> dict:
        """What the server knows of its clients: numbers (in the order it first saw their SuperNodes) and counts."""
        job = self.server_job
        rows = []
        for index in sorted(set(job.train_replies) | set(job.eval_replies)):
            trained, scored = job.train_replies.get(index, {}), job.eval_replies.get(index, {})
            rows.append({"index": index, "name": f"node-{index}", "train": int(trained.get("num-examples", 0)),
                         "held_out": int(scored.get("num-examples", 0)), "groups": {}})
        return {"format": self.split.detected_format, "duplicates_removed": None,
                "global_held_out": len(self.split.global_held_out), "global_held_out_from": "data.eval",
                "clients": rows, "records_from": "each SuperNode's --node-config; counts as the clients reported them "
                "(train: training records; held_out: held-out records scored, at most eval.max_examples)"}

    def score_base(self, state: dict) -> dict:
        """Round 0: the base model on the global held-out set. No few-shot prompt baseline: its examples would come
        from the clients' training records, which the server never holds."""
        return self.bench.score(state, self.split.global_held_out, self.global_tok, label="base model")


def _flwr() -> str | None:
    from tuneforge.federated.run import _version

    return _version("flwr")


def _make_server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        from rich.console import Console

        output = context.run_config.get("run-dir")
        if not isinstance(output, str) or not output.strip():
            raise RecipeError(["the Flower App's run config has no `run-dir`; write the App with tuneforge federated "
                               "app RECIPE --output APP_DIR"])
        recipe = recipe_from_run_config(context.run_config)
        DeployedRun(recipe, _pieces(), Console()).run_on(grid, output)

    return app


# The objects the App's pyproject.toml names ([tool.flwr.app.components]); Flower finds them by these assignments.
server_app = _make_server_app()
client_app = _make_client_app()
