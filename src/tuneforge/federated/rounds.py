"""The record of a federated run's rounds: the per-round scores, the round checkpoints a resume starts from, and
the training budget the baselines get.

  checkpoints/round-<N>/   the global adapter after round N (adapter_model.safetensors) and round.json (the history
                           through round N); written into checkpoints/.tmp/ and renamed, so a round folder is whole
                           or absent and `tuneforge train --resume RUN` restarts at the first round not in one
  eval/rounds.json         the same history, for reading
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from tuneforge.errors import RunDirError

TMP = ".tmp"


def primary_metric(recipe, spec) -> tuple[str, bool]:
    """(name, higher is better) of the score the report leads with: the first eval.metrics name for methods scored
    by generation, else the held-out loss."""
    if spec.hooks.get("scores") == "generation" and recipe.eval.metrics:
        first = recipe.eval.metrics[0]
        return (first if isinstance(first, str) else str(first.get("name"))), True
    return "eval_loss", False


def score_of(result: dict | None, metric: str):
    if not result:
        return None
    return result.get("eval_loss") if metric == "eval_loss" else (result.get("metrics") or {}).get(metric)


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"min": min(values), "max": max(values), "mean": mean, "std": std, "range": max(values) - min(values)}


def client_result(record: dict) -> dict:
    """A client's evaluate MetricRecord (numbers only) -> {"metrics", "eval_loss", "n"}."""
    metrics = {k[len("score:"):]: v for k, v in record.items() if k.startswith("score:")}
    return {"metrics": metrics, "eval_loss": record.get("eval-loss"), "n": int(record.get("num-examples", 0))}


def train_result(record: dict) -> dict:
    return {"steps": int(record.get("steps", 0)), "examples": int(record.get("num-examples", 0)),
            "train_loss": record.get("train-loss")}


def round_entry(number: int, global_result: dict | None, clients: dict, trained: dict, metric: str,
                seconds: float | None) -> dict:
    values = [v for v in (score_of(c, metric) for c in clients.values()) if v is not None]
    return {"round": number, "global": global_result, "clients": {str(k): v for k, v in sorted(clients.items())},
            "trained": {str(k): v for k, v in sorted(trained.items())}, "spread": spread(values),
            "seconds": None if seconds is None else round(seconds, 1)}


def write_round(run, number: int, state: dict, history: list[dict]) -> Path:
    """checkpoints/round-<number>/ with the global adapter and the history so far, whole or absent."""
    from safetensors.torch import save_file

    from tuneforge.checkpoints import fsync_tree, publish

    root = run.file("checkpoints")
    staging = root / TMP / f"round-{number}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "adapter_model.safetensors"))
    (staging / "round.json").write_text(json.dumps({"round": number, "history": history}, indent=1, default=str),
                                        encoding="utf-8")
    fsync_tree(staging)
    final = root / f"round-{number}"
    publish(staging, final)
    run.write_json("eval/rounds.json", history)
    return final


def completed_rounds(run) -> list[int]:
    root = run.file("checkpoints")
    rounds = []
    for folder in root.glob("round-*") if root.is_dir() else []:
        suffix = folder.name.split("-", 1)[1]
        if suffix.isdigit() and (folder / "round.json").is_file() and (folder / "adapter_model.safetensors").is_file():
            rounds.append(int(suffix))
    return sorted(rounds)


def load_round(run, number: int, order=None) -> tuple[dict, list[dict]]:
    """(global adapter tensors, history) saved after round `number`; the tensors in `order` (the adapter's own
    order of names: safetensors files keep them sorted) when given."""
    from safetensors.torch import load_file

    folder = run.file("checkpoints") / f"round-{number}"
    state = load_file(str(folder / "adapter_model.safetensors"))
    if order is not None:
        state = {name: state[name] for name in order}
    history = json.loads((folder / "round.json").read_text(encoding="utf-8"))["history"]
    return state, history


def resume_point(run, rounds: int) -> int:
    """The last complete round of an unfinished federated run (0: none yet, start from round 1)."""
    if not run.file("recipe.yaml").is_file():
        raise RunDirError(f"{run.path} is not a tuneforge run directory (no recipe.yaml)", fix="pass the run directory")
    if run.status == "completed":
        raise RunDirError(f"run {run.path} already completed; nothing to resume",
                          fix="train a new run (--output), or raise federated.rounds in a new recipe")
    done = [r for r in completed_rounds(run) if r <= rounds]
    return done[-1] if done else 0


def clear_partial(run) -> None:
    """A round checkpoint cut short (the process died while writing it): removed, under the run's lock."""
    shutil.rmtree(run.file("checkpoints") / TMP, ignore_errors=True)


def keep_rows_through(run, last_round: int, done_baselines: set[str]) -> None:
    """On resume: drop metrics rows of rounds after the last complete one and of baselines not finished."""
    kept = []
    for row in run.metrics():
        if row.get("round") is not None and row["round"] > last_round:
            continue
        if row.get("baseline") is not None and row["baseline"] not in done_baselines:
            continue
        kept.append(row)
    run.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def client_steps(fed, recipe, n_train: int) -> int:
    """Optimizer steps one client trains in a round."""
    if fed.local_steps is not None:
        return fed.local_steps
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    return max(1, math.ceil(fed.local_epochs * n_train / per_step))


def budgets(fed, recipe, train_sizes: list[int], sampled: int) -> dict:
    """The baselines' budgets, in optimizer steps of the same batch: central = every step the federation trains
    (rounds x the clients sampled per round); a client alone = the steps it trains in the federation."""
    share = sampled / len(train_sizes)
    steps = [client_steps(fed, recipe, n) for n in train_sizes]
    return {"central": max(1, round(fed.rounds * share * sum(steps))),
            "local": [max(1, round(fed.rounds * share * s)) for s in steps],
            "per_round": steps}
