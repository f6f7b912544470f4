"""The federated run's comparisons (federated.baselines), trained in the server's process from the same fresh
adapter, with the same trainer and batch:

  central  the federation's whole budget (every step its clients trained) on the pooled training records: what
           pooling the data would have given; scored on the global held-out set and on each client's held-out set
  local    each client alone on its own records, for the steps it trained in the federation; scored on the global
           held-out set and on its own held-out set

Each finished baseline is recorded in eval/baselines.json at once, so a resumed run does not train it again.
"""

from __future__ import annotations

from tuneforge.federated import rounds as R


def run_baselines(fr, run, budget: dict) -> dict:
    """fr: the FederatedRun (its recipe, split, Workbench, fresh adapter). -> {"central": {...}, "local": {...}}"""
    bench, split, recipe, console = fr.bench, fr.split, fr.recipe, fr.console
    done = run.read_json("eval/baselines.json", {}) or {}
    seed = recipe.train.seed
    tokenized = {s.index: (bench.tokenize(s.train), bench.tokenize(s.held_out)) for s in split.shards}

    def score(state, examples, tokenized, label):
        result = bench.score(state, examples, tokenized, label=label)
        result.pop("samples", None)  # the run's report shows the federated adapter's samples (eval/tuned.json)
        return result

    def record(key: str, value: dict) -> None:
        done[key] = value
        run.write_json("eval/baselines.json", done)

    if "central" in fr.fed.baselines and "central" not in done:
        pooled = [t for s in split.shards for t in tokenized[s.index][0]]
        console.print(f"[bold]baseline central[/]: {budget['central']} steps on the {len(pooled)} pooled training "
                      f"records")
        result = bench.train(fr.initial, pooled, steps=budget["central"], seed=seed, sink=run.append_metrics,
                             tags={"baseline": "central"}, console=console)
        entry = {"steps": result.steps, "train_loss": result.train_loss,
                 "global": score(result.state, split.global_held_out, fr.global_tok, "central, global"),
                 "clients": {str(s.index): score(result.state, s.held_out, tokenized[s.index][1],
                                                 f"central, client {s.index}") for s in split.shards}}
        record("central", entry)
        _say(console, "central", entry, fr.metric)
    if "local" in fr.fed.baselines:
        for shard in split.shards:
            key = f"local:{shard.index}"
            if key in done:
                continue
            own_train, own_held = tokenized[shard.index]
            steps = budget["local"][shard.index]
            console.print(f"[bold]baseline {shard.name} alone[/]: {steps} steps on its {len(own_train)} records")
            result = bench.train(fr.initial, own_train, steps=steps, seed=seed, sink=run.append_metrics,
                                 tags={"baseline": key}, console=console)
            entry = {"name": shard.name, "steps": result.steps, "train_loss": result.train_loss,
                     "global": score(result.state, split.global_held_out, fr.global_tok, f"{shard.name} alone, global"),
                     "own": score(result.state, shard.held_out, own_held, f"{shard.name} alone, own")}
            record(key, entry)
            _say(console, f"{shard.name} alone", entry, fr.metric)
    return {"central": done.get("central"),
            "local": {k.split(":", 1)[1]: v for k, v in sorted(done.items()) if k.startswith("local:")}}


def _say(console, label: str, entry: dict, metric: str) -> None:
    value = R.score_of(entry["global"], metric)
    console.print(f"  {label}: global {metric} " + ("-" if value is None else f"{value:.4g}"))


def comparison(fr, baselines: dict) -> dict:
    """The headline: the federated global score against central training and against each client alone."""
    metric, higher = fr.metric, fr.higher
    last = fr.history[-1]
    federated = R.score_of(last["global"], metric)
    base = R.score_of(fr.history[0]["global"], metric) if fr.history[0]["round"] == 0 else None
    central = R.score_of((baselines.get("central") or {}).get("global"), metric)
    local = {v.get("name", k): R.score_of(v.get("global"), metric) for k, v in (baselines.get("local") or {}).items()}
    local_values = [v for v in local.values() if v is not None]
    best_local = (max(local_values) if higher else min(local_values)) if local_values else None
    sign = 1 if higher else -1
    out = {"metric": metric, "higher_is_better": higher, "base": base, "federated": federated, "central": central,
           "local": local, "best_local": best_local,
           "federated_minus_central": None if federated is None or central is None else federated - central,
           "federated_minus_best_local": None if federated is None or best_local is None else federated - best_local}
    if out["federated_minus_best_local"] is not None:
        out["beats_every_client_alone"] = sign * out["federated_minus_best_local"] > 0
    return out
