"""Reading a run directory for the report: metrics.jsonl, summary.json, eval/*.json, recipe.yaml and the rest, each
optional (see tuneforge.report for the list), into one RunData."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.evaluate.baselines import BASELINE_FILES, BASELINES


@dataclass
class RunData:
    path: Path
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)  # base / few_shot / tuned
    forgetting: dict | None = None
    contamination: dict | None = None
    early_stopping: dict | None = None
    judge: dict | None = None
    recipe_text: str = ""
    recipe: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    data_stats: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.recipe.get("name") or self.path.name

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a metrics.jsonl key, in order, skipping rows without it."""
        points = [(row.get("step", i), row[key]) for i, row in enumerate(self.rows)
                  if isinstance(row.get(key), (int, float)) and not _bad(row[key])]
        return [p[0] for p in points], [p[1] for p in points]

    def train_loss_series(self):
        return self.series("loss")

    def eval_loss_series(self):
        """Held-out loss at each evaluation, plus the final one from summary.json when metrics.jsonl lacks it."""
        x, y = self.series("eval_loss")
        final = (self.summary.get("eval_loss") or {}).get("tuned")
        steps = self.summary.get("steps")
        if final is not None and steps is not None and (not x or x[-1] < steps):
            x, y = x + [steps], y + [final]
        return x, y

    def baseline_table(self) -> dict[str, dict[str, float | None]]:
        """{metric: {"base", "few_shot", "tuned"}} from eval/*.json, completed from summary.json."""
        table: dict[str, dict] = {}
        for key, result in self.evals.items():
            for name, value in (result.get("metrics") or {}).items():
                table.setdefault(name, {k: None for k in BASELINES})[key] = value
        for name, values in (self.summary.get("metrics") or {}).items():
            row = table.setdefault(name, {k: None for k in BASELINES})
            for key in BASELINES:
                if row.get(key) is None and isinstance(values, dict):
                    row[key] = values.get(key)
        return table

    def eval_losses(self) -> dict[str, float | None]:
        losses = dict(self.summary.get("eval_loss") or {})
        for key in BASELINES:
            losses.setdefault(key, None)
            loss = (self.evals.get(key) or {}).get("loss")  # evaluate/loss.py result saved with the eval, if any
            if losses[key] is None and isinstance(loss, dict):
                losses[key] = loss.get("loss")
        if losses.get("tuned") is None:
            _, values = self.series("eval_loss")
            if values and self.summary.get("steps"):
                losses["tuned"] = values[-1]
        return losses


def _bad(value) -> bool:
    return isinstance(value, float) and (math.isnan(value) or math.isinf(value))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def load_run(run_dir: str | Path) -> RunData:
    """Everything the report needs from a run directory; missing or unreadable files are left empty."""
    import yaml

    from tuneforge.errors import RunDirError

    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory", fix="pass a run directory (runs/<name>)")
    if not any((path / name).exists() for name in ("recipe.yaml", "status.json", "metrics.jsonl")):
        raise RunDirError(f"{path} is not a tuneforge run directory (no recipe.yaml, status.json or metrics.jsonl)")
    data = RunData(path)
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict):
                data.rows.append(row)
    data.summary = read_json(path / "summary.json") or {}
    for key, name in BASELINE_FILES.items():
        result = read_json(path / "eval" / name)
        if isinstance(result, dict):
            data.evals[key] = result
    data.forgetting = read_json(path / "eval" / "forgetting.json")
    if data.forgetting and "comparison" not in data.forgetting and data.forgetting.get("before") and data.forgetting.get("after"):
        from tuneforge.evaluate.forgetting import compare

        data.forgetting["comparison"] = compare(data.forgetting["before"], data.forgetting["after"])
    data.contamination = read_json(path / "eval" / "contamination.json")
    data.early_stopping = read_json(path / "eval" / "early_stopping.json")
    data.judge = read_json(path / "eval" / "judge.json")
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        data.recipe_text = recipe.read_text(encoding="utf-8")
        try:
            data.recipe = yaml.safe_load(data.recipe_text) or {}
        except yaml.YAMLError:
            data.recipe = {}
    data.environment = read_json(path / "environment.json") or {}
    data.status = read_json(path / "status.json") or {}
    data.data_stats = read_json(path / "data_stats.json") or {}
    return data
