"""The runs under the runs folder, read from their files: status.json (running / failed with its error / completed /
interrupted; a `running` run whose process is gone is shown as `killed`), metrics.jsonl (the charts), the recipe and
data counts (the step total for progress and ETA), report.html; and the comparison of several runs
(tuneforge.report's `comparison_rows` and `write_comparison`)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from tuneforge.board.state import BOARD_DIR, RUN_FILES, BoardError, BoardState

CHART_KEYS = ("loss", "eval_loss", "learning_rate", "tokens_per_s", "grad_norm", "reward")
MAX_COMPARED = 8


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def metric_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a kill (or being written now) is skipped."""
    rows = []
    try:
        text = (path / "metrics.jsonl").read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_run(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and any((path / name).exists() for name in RUN_FILES)


def run_state(state: BoardState, path: Path) -> tuple[str, dict, bool]:
    """(state shown, status.json, a process is writing the run): `killed` when status.json says running but no
    process holds the run's lock (nor is the board's job for it alive)."""
    from tuneforge.run import lock_holder

    status = _read_json(path / "status.json") or {}
    shown = status.get("state", "unknown")
    job = state.jobs.running_for(state.run_id(path)) if state.jobs else None
    live = lock_holder(path) is not None or job is not None
    if shown == "running" and not live:
        shown = "killed"
    return shown, status, live


def run_summary(state: BoardState, path: Path) -> dict:
    shown, status, live = run_state(state, path)
    recipe = _read_yaml(path / "recipe.yaml")
    summary = _read_json(path / "summary.json") or {}
    model = recipe.get("model")
    has_checkpoint = bool(_checkpoints(path))
    return {"id": state.run_id(path), "name": recipe.get("name") or path.name, "state": shown, "live": live,
            "error": status.get("error"), "method": recipe.get("method"),
            "model": model.get("name") if isinstance(model, dict) else model,
            "adapter": (recipe.get("adapter") or {}).get("type"), "steps": summary.get("steps"),
            "started": status.get("started"), "finished": status.get("finished"),
            "has_report": (path / "report.html").is_file(), "has_checkpoint": has_checkpoint,
            "resumable": not live and has_checkpoint and shown in ("interrupted", "failed", "killed"),
            "stages": [s.name for s in sorted(path.iterdir()) if _is_run(s)] if (path / "stages.json").exists() else []}


def list_runs(state: BoardState) -> list[dict]:
    """Every run folder under the runs folder (and the stage runs of a multi-stage run), newest first."""
    out = []
    if not state.runs_dir.is_dir():
        return out
    for entry in state.runs_dir.iterdir():
        if entry.name.startswith(".") or entry.name == BOARD_DIR or not _is_run(entry):
            continue
        out.append(run_summary(state, entry))
        for stage in out[-1]["stages"]:
            out.append(run_summary(state, entry / stage))
    return sorted(out, key=lambda r: (-(r["started"] or 0), r["id"]))


def _checkpoints(path: Path) -> list[Path]:
    folder = path / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def total_steps(path: Path, recipe: dict) -> tuple[int | None, bool]:
    """(optimizer steps the run will take, exact?): a checkpoint's trainer state knows; else the recipe's
    max_steps; else estimated from the data counts (examples / effective batch x epochs)."""
    for checkpoint in reversed(_checkpoints(path)):
        known = (_read_json(checkpoint / "trainer_state.json") or {}).get("max_steps")
        if isinstance(known, int) and known > 0:
            return known, True
    train = recipe.get("train") or {}
    if isinstance(train.get("max_steps"), int):
        return train["max_steps"], True
    examples = (_read_json(path / "data_stats.json") or {}).get("train_examples")
    try:
        per_step = int(train.get("batch_size", 4)) * int(train.get("grad_accum", 4))
        return max(1, math.ceil(examples / per_step * float(train.get("epochs", 1)))), False
    except (TypeError, ValueError, ZeroDivisionError):
        return None, False


def run_detail(state: BoardState, run_id: str) -> dict:
    """Everything the run page polls: status, progress and ETA, chart series, the board's job and its log."""
    path = state.run_path(run_id, must_exist=False)
    job = state.jobs.latest_for(run_id)
    if not _is_run(path):
        if job is None:
            raise BoardError(f"run {run_id!r}: no such run under {state.runs_dir}", status=404)
        return {"id": run_id, "exists": False, "state": "starting" if job.returncode is None else "failed",
                "job": job.describe(log=True)}
    out = run_summary(state, path)
    rows = metric_rows(path)
    series = {key: [[r.get("step", i), r[key]] for i, r in enumerate(rows) if _finite(r.get(key)) and
                    not (key == "loss" and "train_loss" in r)] for key in CHART_KEYS}
    series["eval"] = {k: [[r.get("step", 0), r[k]] for r in rows if _finite(r.get(k))] for k in _eval_keys(rows)}
    recipe = _read_yaml(path / "recipe.yaml")
    total, exact = total_steps(path, recipe)
    trained = [r for r in rows if "loss" in r and "train_loss" not in r]
    step = max((r.get("step", 0) for r in trained), default=0)
    elapsed = max((r.get("time", 0) for r in trained), default=0)
    eta = None
    if total and step and out["state"] == "running" and step < total:
        eta = elapsed / step * (total - step)
    if out["state"] == "completed":
        step = max(step, (_read_json(path / "summary.json") or {}).get("steps") or step)
        total = total if total and total >= step else step
    out.update(exists=True, series=series, progress={"step": step, "total": total, "exact": exact,
                                                     "elapsed": elapsed, "eta": eta},
               job=job.describe(log=True) if job else None)
    return out


def _eval_keys(rows: list[dict]) -> list[str]:
    keys = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("eval_") and _finite(value) and key not in keys and not key.endswith(
                    ("_runtime", "_per_second", "_preparation_time", "num_tokens")):
                keys.append(key)
    return keys


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# Reports and comparisons


def report_file(state: BoardState, run_id: str, *, write: bool = False) -> Path:
    """The run's report.html; `write` (re)writes it first (tuneforge.report.write_report) unless the run is writing."""
    path = state.run_path(run_id)
    if write:
        _, _, live = run_state(state, path)
        if live:
            raise BoardError(f"run {run_id} is still running; its report is written when it ends")
        from tuneforge.report import write_report

        with state.heavy:
            write_report(path)
    target = path / "report.html"
    if not target.is_file():
        raise BoardError(f"run {run_id} has no report.html yet", fix="write it with the button (or tuneforge report "
                         "RUN) once the run has ended", status=404)
    return target


def compare(state: BoardState, run_ids: list[str]) -> dict:
    """Several runs side by side: the report's comparison rows, their curves, and the comparison page written by
    tuneforge.report.write_comparison under <runs>/.board/compare/."""
    from tuneforge.report import comparison_rows, load_run, write_comparison

    if not isinstance(run_ids, list) or not 2 <= len(run_ids) <= MAX_COMPARED or len(set(run_ids)) != len(run_ids):
        raise BoardError(f"compare: choose 2 to {MAX_COMPARED} different runs")
    paths = [state.run_path(r) for r in run_ids]
    runs = [load_run(p) for p in paths]
    labels = [r.name if sum(o.name == r.name for o in runs) == 1 else run_id for r, run_id in zip(runs, run_ids)]
    rows = [{"label": label, "cells": cells} for label, cells in comparison_rows(runs)]
    curves = {"loss": {}, "eval_loss": {}}
    for label, run in zip(labels, runs):
        for key in curves:
            x, y = run.eval_loss_series() if key == "eval_loss" else run.series(key)
            curves[key][label] = [[a, b] for a, b in zip(x, y)]
    digest = hashlib.sha256("\n".join(run_ids).encode()).hexdigest()[:16]
    with state.heavy:
        page = write_comparison(paths, state.board_dir / "compare" / f"compare-{digest}.html")
    return {"runs": run_ids, "labels": labels, "rows": rows, "curves": curves, "page": page.name}


def comparison_page(state: BoardState, name: str) -> Path:
    if not (name.startswith("compare-") and name.endswith(".html") and "/" not in name and ".." not in name):
        raise BoardError("no such comparison page", status=404)
    target = state.board_dir / "compare" / name
    if not target.is_file():
        raise BoardError("no such comparison page (compare the runs again)", status=404)
    return target
