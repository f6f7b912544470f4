"""The Flower side: the ClientApp and ServerApp of a federated run (Flower's Message API), the strategy (FedAvg or
FedProx from flwr.serverapp.strategy, wrapped in Flower's DP fixed-clipping wrapper when federated.privacy is set),
the wire check on every message, and the simulation engine that runs them on one machine.

What crosses the client boundary, both ways, is checked on every message (`check_content`): an ArrayRecord whose
tensor names are exactly the adapter's, a ConfigRecord of numbers (round, proximal mu, clipping norm), a MetricRecord
of numbers (example count, client index, losses, scores). Anything else -- text, bytes, token ids, another tensor --
stops the run. `OBSERVERS` (tests) see each message's content as the bytes Flower puts on the wire.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field

from tuneforge.errors import TuneforgeError

OBSERVERS: list = []  # callables (direction: "server -> client" | "client -> server", message_type, wire bytes)


class PayloadError(TuneforgeError):
    """A message would carry something other than adapter tensors and numbers across the client boundary."""


class ClientFailed(TuneforgeError):
    """A client's ClientApp raised; its reason (the traceback text Flower returns) is in the message."""


# ---------------------------------------------------------------------------------------------------------------
# The wire check


def wire_bytes(content) -> bytes:
    """A RecordDict as Flower serialises it for transport (every nested object's deflated bytes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(content).values())


def check_content(content, *, adapter_names: set[str], direction: str, message_type: str) -> int:
    """Refuse a message content that carries anything but the adapter's tensors and numbers; returns its size in
    bytes on the wire."""
    where = f"{direction} {message_type} message"
    for name, record in content.array_records.items():
        keys = set(record.keys())
        if keys != adapter_names:
            odd = sorted(keys - adapter_names)[:3] or sorted(adapter_names - keys)[:3]
            raise PayloadError(f"{where}: ArrayRecord {name!r} does not hold exactly the adapter's tensors ({odd})",
                               fix="this is a bug in tuneforge's federated code: please report it")
    for kind, records in (("config", content.config_records), ("metrics", content.metric_records)):
        for name, record in records.items():
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                numbers = all(isinstance(v, (int, float, bool)) for v in values)
                if not numbers or (isinstance(value, list) and len(value) > 8):
                    raise PayloadError(f"{where}: {kind} record {name!r} key {key!r} holds {type(value).__name__} "
                                       "data; only a few numbers may cross the client boundary",
                                       fix="this is a bug in tuneforge's federated code: please report it")
    data = wire_bytes(content)
    for observer in OBSERVERS:
        observer(direction, message_type, data)
    return len(data)


class RunStopped(Exception):
    """The run's process is stopping (Ctrl-C, or an error outside the ServerApp): the ServerApp's wait ends."""


class AuditedGrid:
    """The Grid Flower hands the ServerApp, with every message checked both ways, client errors raised, and a wait
    for replies that ends when `stop` is set (Flower's own waits up to the strategy's timeout, an hour, which would
    keep a stopped run's process alive)."""

    def __init__(self, grid, adapter_names: set[str], traffic: dict, stop, *, number_nodes: bool = False):
        self._grid, self.names, self.traffic, self.stop = grid, adapter_names, traffic, stop
        # Deployment engine: a client does not know its number (its records are its own, not a shard of a split),
        # and Flower's node ids (64-bit unsigned) do not fit a MetricRecord. The server numbers the SuperNodes in
        # the order it first sees them (sorted node ids) and writes that number into each reply's metrics.
        self.node_index: dict[int, int] | None = {} if number_nodes else None

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_node_ids(self):
        ids = sorted(self._grid.get_node_ids())
        if self.node_index is not None:
            for node in ids:
                self.node_index.setdefault(node, len(self.node_index))
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        import time

        messages = list(messages)
        for m in messages:
            self._count("to_client", check_content(m.content, adapter_names=self.names, direction="server -> client",
                                                   message_type=m.metadata.message_type))
        waiting = set(self._grid.push_messages(messages))
        replies, deadline = [], None if timeout is None else time.time() + timeout
        while waiting and (deadline is None or time.time() < deadline):
            if self.stop.is_set():
                raise RunStopped("the run is stopping")
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(0.1)
        for reply in replies:
            if reply.has_error():
                again = ("resume the run with tuneforge train --resume RUN" if self.node_index is None else
                         "write the App again with a new --run-dir (tuneforge federated app) and flwr run it")
                raise ClientFailed(f"a client failed ({reply.error.reason.strip()[-1500:]})",
                                   fix=f"the client's error is above; fix it and {again}")
            self._count("to_server", check_content(reply.content, adapter_names=self.names, direction="client -> server",
                                                   message_type=reply.metadata.message_type))
            if self.node_index is not None:
                number = self.node_index.setdefault(reply.metadata.src_node_id, len(self.node_index))
                for record in reply.content.metric_records.values():
                    record["client"] = number
        return replies

    def _count(self, direction: str, size: int) -> None:
        self.traffic[f"{direction}_messages"] = self.traffic.get(f"{direction}_messages", 0) + 1
        self.traffic[f"{direction}_bytes"] = self.traffic.get(f"{direction}_bytes", 0) + size


# ---------------------------------------------------------------------------------------------------------------
# The ClientApp


@dataclass
class ClientJob:
    """What every client process needs, all plain data: the recipe (its JSON form), its folder (for metric files),
    the run's metrics.jsonl (simulation: the per-step rows go there), and how long to train per round."""

    recipe: dict
    pieces: object  # federated.pieces.Pieces: train.py's functions (pickled by reference)
    base_dir: str | None
    metrics_path: str | None
    local_steps: int | None
    local_epochs: float | None
    seed: int
    clipping: str | None = None  # "client": Flower's fixedclipping_mod clips each update before it is sent
    # (job, context) -> (client number, shard, tokenized training, tokenized held-out); None: the simulation's
    # shard of the recipe's split (client_shard, numbered by the virtual SuperNode's partition-id)
    records: object = None


_SHARDS: dict = {}


def client_shard(job: ClientJob, index: int):
    """(shard, tokenized training examples, tokenized held-out) of client `index`: computed from the recipe by
    every process in the same way; a client keeps only its own."""
    import json

    from tuneforge.federated.local import workbench_for
    from tuneforge.federated.split import split_recipe_data
    from tuneforge.recipe import Recipe

    key = (json.dumps(job.recipe, sort_keys=True), index)
    if key not in _SHARDS:
        bench = workbench_for(job.recipe, job.pieces, job.base_dir)
        recipe = Recipe.model_validate(job.recipe)
        shard = split_recipe_data(recipe).shards[index]
        _SHARDS.clear()
        _SHARDS[key] = (shard, bench.tokenize(shard.train), bench.tokenize(shard.held_out))
    return _SHARDS[key]


def _metrics_sink(path: str | None):
    if not path:
        return None
    import json

    def append(row: dict) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    return append


def build_client_app(job: ClientJob):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    mods = []
    if job.clipping == "client":
        from flwr.app import MessageType
        from flwr.clientapp.mod import fixedclipping_mod

        def clip_train_updates(msg, context, call_next):
            """Flower's fixedclipping_mod, on train messages only: in flwr 1.32 it also demands the clipping norm on
            evaluate messages, which its own DP wrapper sends without one. Its errors are re-addressed to the
            message they answer (it addresses them to the client's reply, which the SuperLink drops: the server
            would wait for that reply until its timeout)."""
            if msg.metadata.message_type != MessageType.TRAIN:
                return call_next(msg, context)
            out = fixedclipping_mod(msg, context, call_next)
            if out.has_error() and out.metadata.reply_to_message_id != msg.metadata.message_id:
                return Message(out.error, reply_to=msg)
            return out

        mods.append(clip_train_updates)
    app = ClientApp(mods=mods)

    def setup(msg, context):
        import torch  # noqa: F401 (ArrayRecord.to_torch_state_dict needs it imported)

        from tuneforge.federated.local import workbench_for

        config = msg.content["config"]
        global_round = int(config["server-round"]) + int(config.get("round-offset", 0))
        state = msg.content["arrays"].to_torch_state_dict()
        bench = workbench_for(job.recipe, job.pieces, job.base_dir)
        if job.records is not None:
            index, *data = job.records(job, context)
            return index, global_round, state, bench, tuple(data)
        index = int(context.node_config["partition-id"])
        return index, global_round, state, bench, client_shard(job, index)

    @app.train()
    def train(msg, context):
        index, global_round, state, bench, (shard, train_tok, _held) = setup(msg, context)
        mu = msg.content["config"].get("proximal-mu")
        result = bench.train(state, train_tok, steps=job.local_steps, epochs=job.local_epochs,
                             seed=job.seed + 1009 * global_round + index, proximal_mu=float(mu) if mu else None,
                             sink=_metrics_sink(job.metrics_path), tags={"round": global_round, "client": index},
                             federation_round=(global_round, int(msg.content["config"]["rounds"])))
        metrics = {"num-examples": len(train_tok), "client": index, "steps": result.steps}
        if result.train_loss is not None and math.isfinite(result.train_loss):
            metrics["train-loss"] = result.train_loss
        ordered = {name: result.state[name] for name in state}  # the order received (Flower's DP mod compares it)
        return Message(RecordDict({"arrays": ArrayRecord(ordered), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        index, global_round, state, bench, (shard, _train, held_tok) = setup(msg, context)
        scores = bench.score(state, shard.held_out, held_tok, label=f"client {index}, round {global_round}")
        metrics = {"num-examples": max(1, scores["n"]), "client": index}
        metrics.update({f"score:{k}": float(v) for k, v in scores["metrics"].items()})
        if scores.get("eval_loss") is not None:
            metrics["eval-loss"] = float(scores["eval_loss"])
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------------------------
# The ServerApp


@dataclass
class ServerJob:
    """The server's side of a run: the strategy's settings and the hooks of the run's life (run.py)."""

    clients: int
    rounds_left: int
    round_offset: int
    fraction: float
    aggregation: str
    proximal_mu: float | None
    privacy: object | None  # PrivacySection
    seed: int
    initial: dict  # adapter tensors to start from (the global adapter of the last complete round, or the fresh one)
    on_round: object  # (global round, ArrayRecord) -> MetricRecord | None: score, checkpoint, record
    adapter_names: set = field(default_factory=set)
    train_replies: dict = field(default_factory=dict)  # client index -> its last train metrics
    eval_replies: dict = field(default_factory=dict)  # client index -> its last evaluate metrics
    traffic: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the run's process stops waiting

    @property
    def sampled(self) -> int:
        return max(1, int(self.clients * self.fraction))


def _recording(store: dict):
    def aggregate(contents, weight_key):
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        store.clear()
        for content in contents:
            record = next(iter(content.metric_records.values()))
            store[int(record["client"])] = dict(record)
        return aggregate_metricrecords(contents, weight_key)

    return aggregate


def build_strategy(job: ServerJob):
    from flwr.serverapp.strategy import FedAvg, FedProx

    common = dict(fraction_train=job.fraction, fraction_evaluate=1.0, min_train_nodes=job.sampled,
                  min_evaluate_nodes=job.clients, min_available_nodes=job.clients,
                  train_metrics_aggr_fn=_recording(job.train_replies),
                  evaluate_metrics_aggr_fn=_recording(job.eval_replies))
    strategy = FedProx(proximal_mu=job.proximal_mu, **common) if job.aggregation == "fedprox" else FedAvg(**common)
    privacy = job.privacy
    if privacy is not None:
        from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                             DifferentialPrivacyServerSideFixedClipping)

        wrapper = (DifferentialPrivacyClientSideFixedClipping if privacy.clipping == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
        strategy = wrapper(strategy, noise_multiplier=privacy.noise_multiplier, clipping_norm=privacy.clipping_norm,
                           num_sampled_clients=job.sampled)
    return strategy


def build_server_app(job: ServerJob):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        serve(job, grid)

    return app


def serve(job: ServerJob, grid, *, number_nodes: bool = False) -> None:
    """The ServerApp's work on the Grid Flower hands it: the strategy's rounds, every message checked."""
    from flwr.app import ArrayRecord, ConfigRecord

    random.seed(job.seed)  # Flower samples the clients of a round with `random`
    config = {"round-offset": job.round_offset, "rounds": job.round_offset + job.rounds_left}
    build_strategy(job).start(
        grid=AuditedGrid(grid, job.adapter_names, job.traffic, job.stop, number_nodes=number_nodes),
        initial_arrays=ArrayRecord(job.initial), num_rounds=job.rounds_left, train_config=ConfigRecord(dict(config)),
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=lambda server_round, arrays: job.on_round(server_round + job.round_offset, arrays))


# ---------------------------------------------------------------------------------------------------------------
# The engine


def simulate(client_job: ClientJob, server_job: ServerJob, *, device: str) -> None:
    """Flower's simulation engine (flwr.simulation.run_simulation, Ray backend): one virtual SuperNode per client,
    all clients served in turn by one Ray actor that holds the model (so a 2-core machine trains one client at a
    time with every core), the ServerApp in a thread of this process."""
    import logging
    import os
    import warnings

    from flwr.simulation import run_simulation

    cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    gpus = 1.0 if device == "cuda" else 0.0
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": gpus},
               "init_args": {"num_cpus": cpus, "num_gpus": int(gpus), "include_dashboard": False,
                             "log_to_driver": False, "logging_level": "ERROR",
                             "object_store_memory": 256 * 2**20}}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Ray starts its workers at niceness 15: on a shared machine every other process would starve the clients.
    ours = "RAY_worker_niceness" not in os.environ
    if ours:
        os.environ["RAY_worker_niceness"] = "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=build_server_app(server_job), client_app=build_client_app(client_job),
                           num_supernodes=server_job.clients, backend_config=backend)
    finally:
        server_job.stop.set()  # a ServerApp still waiting for replies (Ctrl-C, an error) ends its wait
        if ours:
            os.environ.pop("RAY_worker_niceness", None)
