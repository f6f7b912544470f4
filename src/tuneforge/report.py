"""The run report: a run directory -> plots/*.png and one self-contained report.html (opens offline, images
embedded as base64), and the comparison of several runs (a rich table, and an HTML page).

What it reads (every file optional, so a running or failed run still gets a report):
  metrics.jsonl            rows with step and any of loss, learning_rate, grad_norm, tokens_per_s, eval_loss, eval_*
  summary.json             eval_loss {base, tuned}, metrics {name: {base, few_shot, tuned}}, steps, train_seconds, ...
  eval/baseline.json       base model zero-shot   {"metrics": {...}, "n", "samples": [{prompt, reference, prediction}]}
  eval/few_shot.json       base model, few-shot prompt (prompt-only baseline), same shape
  eval/tuned.json          tuned model, same shape
  eval/forgetting.json     {"before": run_probe(...), "after": run_probe(...), "comparison": compare(...)}
  eval/contamination.json  contamination_report(...)
  eval/early_stopping.json PlateauStopping.summary()
  eval/judge.json          {"pairwise": compare_answers(...), "grades": {name: grade_answers(...)}}
  recipe.yaml, environment.json, status.json, data_stats.json
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.evaluate.baselines import BASELINE_FILES, BASELINE_TITLES, BASELINES

# metrics.jsonl keys that are bookkeeping, not curves worth plotting
_NOT_CURVES = {"step", "epoch", "time", "tokens_seen", "num_input_tokens_seen", "num_tokens", "total_flos",
               "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second",
               "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
               "eval_model_preparation_time", "eval_num_tokens", "eval_loss"}

_COLORS = {"base": "#8c8c8c", "few_shot": "#e6a23c", "tuned": "#2f6fdf", "train": "#2f6fdf", "eval": "#d9534f",
           "before": "#8c8c8c", "after": "#2f6fdf"}


# ---------------------------------------------------------------------------------------------------------------
# Reading a run directory


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


def _read_json(path: Path):
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
    data.summary = _read_json(path / "summary.json") or {}
    for key, name in BASELINE_FILES.items():
        result = _read_json(path / "eval" / name)
        if isinstance(result, dict):
            data.evals[key] = result
    data.forgetting = _read_json(path / "eval" / "forgetting.json")
    if data.forgetting and "comparison" not in data.forgetting and data.forgetting.get("before") and data.forgetting.get("after"):
        from tuneforge.evaluate.forgetting import compare

        data.forgetting["comparison"] = compare(data.forgetting["before"], data.forgetting["after"])
    data.contamination = _read_json(path / "eval" / "contamination.json")
    data.early_stopping = _read_json(path / "eval" / "early_stopping.json")
    data.judge = _read_json(path / "eval" / "judge.json")
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        data.recipe_text = recipe.read_text(encoding="utf-8")
        try:
            data.recipe = yaml.safe_load(data.recipe_text) or {}
        except yaml.YAMLError:
            data.recipe = {}
    data.environment = _read_json(path / "environment.json") or {}
    data.status = _read_json(path / "status.json") or {}
    data.data_stats = _read_json(path / "data_stats.json") or {}
    return data


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure


def _style(axes, title: str, xlabel: str = "step", ylabel: str = ""):
    axes.set_title(title, fontsize=11, loc="left")
    axes.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        axes.set_ylabel(ylabel, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.tick_params(labelsize=8)
    if xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _line(axes, x, y, label, color, *, few_threshold: int = 30):
    axes.plot(x, y, label=label, color=color, linewidth=1.6, marker="o" if len(x) <= few_threshold else None,
              markersize=4)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return path


def make_plots(data: RunData, plots_dir: Path) -> dict[str, Path]:
    """Write the run's PNG plots; returns {name: path} for those that had data."""
    out: dict[str, Path] = {}
    train_x, train_y = data.train_loss_series()
    eval_x, eval_y = data.eval_loss_series()
    if train_x or eval_x:
        figure = _figure()
        axes = figure.add_subplot()
        if train_x:
            _line(axes, train_x, train_y, "train loss", _COLORS["train"])
        if eval_x:
            _line(axes, eval_x, eval_y, "eval loss", _COLORS["eval"])
        _style(axes, "Loss", ylabel="loss")
        axes.legend(fontsize=8, frameon=False)
        out["loss"] = _save(figure, plots_dir / "loss.png")
    for key, title, ylabel in (("learning_rate", "Learning rate", "lr"), ("grad_norm", "Gradient norm", "norm"),
                               ("tokens_per_s", "Throughput", "tokens / s")):
        x, y = data.series(key)
        if x:
            figure = _figure()
            axes = figure.add_subplot()
            _line(axes, x, y, key, _COLORS["train"])
            _style(axes, title, ylabel=ylabel)
            if key == "learning_rate":
                from matplotlib.ticker import FuncFormatter

                axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
            if key == "tokens_per_s":
                axes.set_ylim(bottom=0)  # small fluctuations should look small
            out[key] = _save(figure, plots_dir / f"{key}.png")

    curves = _metric_curve_keys(data)
    if curves:
        columns = min(3, len(curves))
        rows = math.ceil(len(curves) / columns)
        figure = _figure(4.0 * columns, 3.0 * rows)
        for i, key in enumerate(curves):
            axes = figure.add_subplot(rows, columns, i + 1)
            x, y = data.series(key)
            _line(axes, x, y, key, _COLORS["eval"] if key.startswith("eval_") else _COLORS["train"])
            _style(axes, key)
        out["metrics"] = _save(figure, plots_dir / "metrics.png")

    table = data.baseline_table()
    if table:
        out["baselines"] = _save(_baseline_figure(table), plots_dir / "baselines.png")

    comparison = (data.forgetting or {}).get("comparison")
    if comparison and (comparison.get("scores") or comparison.get("per_subject")):
        out["forgetting"] = _save(_forgetting_figure(comparison), plots_dir / "forgetting.png")
    from tuneforge.report_rl import rl_plots

    out.update(rl_plots(data, plots_dir))  # reward, KL, entropy, value loss when RL logged them
    return out


def _metric_curve_keys(data: RunData) -> list[str]:
    keys: list[str] = []
    for row in data.rows:
        for key, value in row.items():
            if key in _NOT_CURVES or key in ("loss", "learning_rate", "grad_norm", "tokens_per_s") or key in keys:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append(key)
    evals = [k for k in keys if k.startswith("eval_")]
    return evals + [k for k in keys if not k.startswith("eval_")]


def _baseline_figure(table: dict[str, dict]):
    names = list(table)
    present = [k for k in BASELINES if any(table[n].get(k) is not None for n in names)]
    figure = _figure(max(5.0, 1.6 * len(names) + 2.5), 3.6)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(present))
    for j, key in enumerate(present):
        xs = [i + (j - (len(present) - 1) / 2) * width for i in range(len(names))]
        values = [table[n].get(key) for n in names]
        bars = axes.bar(xs, [v or 0 for v in values], width * 0.95, label=BASELINE_TITLES[key], color=_COLORS[key])
        for bar, value in zip(bars, values):
            if value is not None:
                axes.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    axes.set_xticks(range(len(names)), names, fontsize=9)
    axes.set_ylim(0, 105)
    _style(axes, "Held-out metrics: baselines vs tuned", xlabel="", ylabel="score (%)")
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def _forgetting_figure(comparison: dict):
    labels, before, after = [], [], []
    for key, values in comparison.get("scores", {}).items():
        labels.append({"accuracy": "probe MC", "accuracy_norm": "MC (len-norm)", "instructions": "instructions"}.get(key, key))
        before.append(values["before"])
        after.append(values["after"])
    for subject, values in comparison.get("per_subject", {}).items():
        labels.append(subject)
        before.append(values["before"])
        after.append(values["after"])
    figure = _figure(max(6.0, 0.75 * len(labels) + 2), 3.6)
    axes = figure.add_subplot()
    xs = range(len(labels))
    axes.bar([x - 0.2 for x in xs], before, 0.38, label="before (base)", color=_COLORS["before"])
    axes.bar([x + 0.2 for x in xs], after, 0.38, label="after (tuned)", color=_COLORS["after"])
    for x, b, a in zip(xs, before, after):
        delta = a - b
        color = "#c0392b" if delta < -comparison.get("threshold", 5.0) else "#333333"
        axes.annotate(f"{delta:+.0f}", (x, max(a, b)), ha="center", va="bottom", fontsize=7, color=color,
                      xytext=(0, 2), textcoords="offset points")
    axes.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0, 110)
    _style(axes, "Forgetting probe: before vs after", xlabel="", ylabel="accuracy (%)")
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# ---------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #ffffff; --soft: #f6f8fb; --accent: #2f6fdf;
        --good: #1e8e3e; --bad: #c0392b; --warn: #b7791f; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
header { background: var(--bg); border-bottom: 1px solid var(--line); }
header .inner { max-width: 1120px; margin: 0 auto; padding: 20px 28px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 14px; margin: 16px 0 8px; }
.sub { color: var(--muted); font-size: 13px; }
section { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px; margin: 18px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-top: 18px; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; margin-top: 2px; }
.card .note { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--good); } .neg { color: var(--bad); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #e6f4ea; color: var(--good); } .badge.bad { background: #fdecea; color: var(--bad); }
.badge.warn { background: #fdf3e1; color: var(--warn); } .badge.info { background: #e8f0fe; color: var(--accent); }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
.plots figure { margin: 0; } .plots figure.wide { grid-column: 1 / -1; }
.plots img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
.plots figure.wide img { width: auto; max-width: 100%; }
table + .plots { margin-top: 14px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-word; margin: 0; }
details { margin: 6px 0; } summary { cursor: pointer; color: var(--accent); }
.sample { border-top: 1px solid var(--line); padding: 10px 0; }
.sample:first-of-type { border-top: none; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 8px; margin-top: 6px; }
.answers .label { color: var(--muted); font-size: 12px; margin-bottom: 2px; }
.answers .marks { font-size: 11px; }
.note { color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _delta(value, digits: int = 1, *, lower_is_better: bool = False) -> str:
    if value is None:
        return '<td class="num">–</td>'
    good = value < 0 if lower_is_better else value > 0
    css = "pos" if good and abs(value) > 1e-12 else ("neg" if abs(value) > 1e-12 else "")
    return f'<td class="num {css}">{value:+.{digits}f}</td>'


def _image(path: Path, alt: str, caption: str = "", wide: bool = False) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = ' class="wide"' if wide else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure{cls}><img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">{cap}</figure>'


def _status_badge(state: str) -> str:
    css = {"completed": "ok", "failed": "bad", "running": "warn"}.get(state, "info")
    return f'<span class="badge {css}">{_e(state)}</span>'


def _card(label: str, value: str, note: str = "") -> str:
    return (f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
            f'<div class="note">{note}</div></div>')


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _headline(data: RunData) -> str:
    cards = []
    losses = data.eval_losses()
    if losses.get("tuned") is not None:
        note = ""
        if losses.get("base") is not None:
            note = f"base {losses['base']:.4f} ({losses['tuned'] - losses['base']:+.4f})"
        cards.append(_card("held-out loss", f"{losses['tuned']:.4f}", _e(note)))
    table = data.baseline_table()
    if table:
        name, values = next(iter(table.items()))
        tuned, base = values.get("tuned"), values.get("base")
        note = f"base {base:.1f}" if base is not None else ""
        if values.get("few_shot") is not None:
            note += f" · few-shot {values['few_shot']:.1f}"
        cards.append(_card(name, _fmt(tuned), _e(note)))
    comparison = (data.forgetting or {}).get("comparison")
    if comparison:
        badge = '<span class="badge bad">drop</span>' if comparison["flagged"] else '<span class="badge ok">ok</span>'
        scores = comparison.get("scores", {})
        shown = [k for k, v in scores.items() if v.get("flagged")] or [k for k in ("accuracy",) if k in scores]
        names = {"accuracy": "probe", "accuracy_norm": "probe (len-norm)", "instructions": "instructions"}
        note = "; ".join(f"{names.get(k, k)} {scores[k]['before']:.1f} → {scores[k]['after']:.1f}" for k in shown)
        cards.append(_card("forgetting", badge, _e(note)))
    if data.contamination:
        c = data.contamination
        badge = '<span class="badge bad">overlap</span>' if c.get("contaminated") else '<span class="badge ok">none</span>'
        cards.append(_card("train/eval overlap", badge, _e(f"{c['exact']['count']} exact, {c['prompt']['count']} prompt of {c['eval']}")))
    steps = data.summary.get("steps")
    if steps is None and data.rows:
        steps = max((r.get("step", 0) for r in data.rows), default=None)
    cards.append(_card("steps", _fmt(steps), _e(f"trained in {_duration(data.summary.get('train_seconds'))}")))
    if data.summary.get("peak_memory_gb") is not None:
        cards.append(_card("peak GPU memory", f"{data.summary['peak_memory_gb']:.1f} GB"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _results_section(data: RunData) -> str:
    table = data.baseline_table()
    losses = data.eval_losses()
    if not table and losses.get("tuned") is None and losses.get("base") is None:
        return ""
    present = [k for k in BASELINES if any(v.get(k) is not None for v in table.values()) or losses.get(k) is not None]
    head = "".join(f'<th class="num">{_e(BASELINE_TITLES[k])}</th>' for k in present)
    head += '<th class="num">tuned − base</th>' if "base" in present and "tuned" in present else ""
    head += '<th class="num">tuned − few-shot</th>' if "few_shot" in present and "tuned" in present else ""
    body = []
    for name, values in table.items():
        cells = "".join(f'<td class="num">{_fmt(values.get(k))}</td>' for k in present)
        if "base" in present and "tuned" in present:
            both = values.get("tuned") is not None and values.get("base") is not None
            cells += _delta(values["tuned"] - values["base"] if both else None)
        if "few_shot" in present and "tuned" in present:
            both = values.get("tuned") is not None and values.get("few_shot") is not None
            cells += _delta(values["tuned"] - values["few_shot"] if both else None)
        body.append(f"<tr><td>{_e(name)} (%)</td>{cells}</tr>")
    for label, transform, digits in (("held-out loss", lambda v: v, 4), ("perplexity", _perplexity, 2)):
        if any(losses.get(k) is not None for k in present):
            values = {k: (transform(losses[k]) if losses.get(k) is not None else None) for k in present}
            cells = "".join(f'<td class="num">{_fmt(values[k], digits)}</td>' for k in present)
            if "base" in present and "tuned" in present:
                both = values.get("tuned") is not None and values.get("base") is not None
                cells += _delta(values["tuned"] - values["base"] if both else None, digits, lower_is_better=True)
            if "few_shot" in present and "tuned" in present:
                both = values.get("tuned") is not None and values.get("few_shot") is not None
                cells += _delta(values["tuned"] - values["few_shot"] if both else None, digits, lower_is_better=True)
            body.append(f"<tr><td>{label}</td>{cells}</tr>")
    n = data.summary.get("n_eval") or next((r.get("n") for r in data.evals.values() if r.get("n")), None)
    note = f"on {n} held-out examples" if n else ""
    few = data.evals.get("few_shot", {}).get("shots")
    if few:
        note += f"; the few-shot baseline shows the base model {few} training examples first"
    verdict = ""
    for name, values in table.items():
        if values.get("few_shot") is not None and values.get("tuned") is not None and values["few_shot"] >= values["tuned"]:
            verdict = (f'<p class="note"><span class="badge warn">note</span> on {_e(name)} the prompt-only baseline '
                       f"matches or beats the tuned model: a prompt may be all this task needs.</p>")
            break
    return (f'<section id="results"><h2>Held-out results</h2><p class="note">{_e(note)}</p>'
            f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{verdict}</section>")


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _plots_section(plots: dict[str, Path]) -> str:
    if not plots:
        return ""
    captions = {"loss": "training loss per logged step; held-out loss at each evaluation",
                "learning_rate": "learning rate schedule", "grad_norm": "gradient norm before clipping",
                "tokens_per_s": "training throughput", "metrics": "other logged metrics over training",
                "baselines": "held-out metrics for each baseline"}
    order = ["loss", "learning_rate", "grad_norm", "tokens_per_s", "metrics", "baselines"]
    figures = [_image(plots[k], k, captions.get(k, ""), wide=k in ("metrics", "baselines")) for k in order if k in plots]
    return f'<section id="training"><h2>Training</h2><div class="plots">{"".join(figures)}</div></section>'


def _forgetting_section(data: RunData, plots: dict[str, Path]) -> str:
    if not data.forgetting:
        return ""
    comparison = data.forgetting.get("comparison") or {}
    badge = '<span class="badge bad">possible forgetting</span>' if comparison.get("flagged") else '<span class="badge ok">no drop</span>'
    rows = []
    names = {"accuracy": "multiple choice (log-likelihood)", "accuracy_norm": "multiple choice (length-normalised)",
             "instructions": "general instructions (pass rate)"}
    for key, values in comparison.get("scores", {}).items():
        flag = ' <span class="badge bad">drop</span>' if values.get("flagged") else ""
        rows.append(f"<tr><td>{_e(names.get(key, key))}{flag}</td><td class='num'>{_fmt(values['before'])}</td>"
                    f"<td class='num'>{_fmt(values['after'])}</td>{_delta(values['delta'])}</tr>")
    for subject, values in comparison.get("per_subject", {}).items():
        rows.append(f"<tr><td>&nbsp;&nbsp;{_e(subject)}</td><td class='num'>{_fmt(values['before'])}</td>"
                    f"<td class='num'>{_fmt(values['after'])}</td>{_delta(values['delta'])}</tr>")
    n = (data.forgetting.get("before") or {}).get("n")
    lost, gained = comparison.get("lost", []), comparison.get("gained", [])
    extra = f"{len(lost)} items lost, {len(gained)} gained" + (f" (lost: {', '.join(lost[:12])})" if lost else "")
    figure = f'<div class="plots">{_image(plots["forgetting"], "forgetting", wide=True)}</div>' if "forgetting" in plots else ""
    return (f'<section id="forgetting"><h2>Forgetting probe {badge}</h2>'
            f'<p class="note">{_e(comparison.get("message", ""))}. General-ability probe ({_e(n or "?")} multiple-choice '
            f"items scored by option log-likelihood, plus short instructions), base model before training vs tuned "
            f"model after. {_e(extra)}.</p>"
            f'<table><thead><tr><th>probe</th><th class="num">before</th><th class="num">after</th>'
            f'<th class="num">change (points)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>{figure}</section>')


def _judge_section(data: RunData) -> str:
    if not data.judge:
        return ""
    parts = []
    pair = data.judge.get("pairwise")
    if pair:
        x, y = pair["names"]
        bias = []
        if pair.get("position_bias"):
            bias.append('<span class="badge bad">position bias</span>')
        if pair.get("length_bias"):
            bias.append('<span class="badge bad">length bias</span>')
        if pair.get("position_consistency") is None:
            bias.append('<span class="badge warn">no usable verdicts</span>')
        if not bias:
            bias.append('<span class="badge ok">no bias flagged</span>')
        parts.append(
            f"<h3>Pairwise: {_e(y)} vs {_e(x)} ({pair['n']} prompts, each judged in both orders) {' '.join(bias)}</h3>"
            f"<table><tbody>"
            f"<tr><td>{_e(y)} wins / {_e(x)} wins / ties</td><td class='num'>{pair['wins'][y]} / {pair['wins'][x]} / {pair['wins']['tie']}</td></tr>"
            f"<tr><td>{_e(y)} win rate (ties count half)</td><td class='num'>{_fmt(pair['win_rate'][y], 1, '%')}</td></tr>"
            f"<tr><td>same verdict in both orders (position consistency)</td><td class='num'>{_fmt(_pct(pair.get('position_consistency')), 1, '%')}</td></tr>"
            f"<tr><td>verdicts for the answer shown first (0.5 = unbiased)</td><td class='num'>{_fmt(pair.get('first_position_rate'), 2)}</td></tr>"
            f"<tr><td>decided pairs won by the longer answer</td><td class='num'>{_fmt(pair.get('longer_preferred_rate'), 2)}</td></tr>"
            f"<tr><td>replies with no verdict</td><td class='num'>{pair.get('unparsed', 0)}</td></tr>"
            f"</tbody></table>")
    grades = data.judge.get("grades") or {}
    if grades:
        rows = "".join(f"<tr><td>{_e(name)}</td><td class='num'>{_fmt(g.get('mean_score'), 2)}</td>"
                       f"<td class='num'>{_fmt(g.get('length_correlation'), 2)}</td><td class='num'>{g.get('unparsed', 0)}</td></tr>"
                       for name, g in grades.items())
        parts.append("<h3>Rubric grades (1-10)</h3><table><thead><tr><th>model</th><th class='num'>mean score</th>"
                     "<th class='num'>score vs length (r)</th><th class='num'>unparsed</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    judge = data.judge.get("judge")
    note = f'<p class="note">judge: {_e(judge)}</p>' if judge else ""
    return f'<section id="judge"><h2>LLM judge</h2>{note}{"".join(parts)}</section>'


def _pct(value):
    return None if value is None else 100.0 * value


def _early_stopping_section(data: RunData) -> str:
    es = data.early_stopping
    if not es:
        return ""
    verdict = (f"stopped at step {es['stopped_at_step']}" if es.get("stopped_early")
               else "did not trigger (training ran its full length)")
    best = f"best {es.get('metric', 'eval_loss')} {_fmt(es.get('best_value'), 4)} at step {_fmt(es.get('best_step'))}"
    checkpoint = f"; best checkpoint: <code>{_e(es['best_checkpoint'])}</code>" if es.get("best_checkpoint") else ""
    return (f'<section id="early-stopping"><h2>Early stopping</h2><p>patience {_e(es.get("patience"))}, min delta '
            f'{_e(es.get("min_delta"))}: {_e(verdict)}; {_e(best)}{checkpoint}.</p></section>')


def _contamination_section(data: RunData) -> str:
    c = data.contamination
    if not c:
        return ""
    badge = '<span class="badge bad">overlap found</span>' if c.get("contaminated") else '<span class="badge ok">clean</span>'
    rows, shown = [], []
    names = {"exact": "whole example", "prompt": "same prompt", "answer": "same answer"}
    for kind in ("exact", "prompt", "answer"):
        part = c.get(kind) or {}
        rows.append(f"<tr><td>{names[kind]}</td><td class='num'>{part.get('count', 0)}</td>"
                    f"<td class='num'>{_fmt(part.get('percent'))}%</td></tr>")
        for example in part.get("examples", [])[:3]:
            if kind != "answer":
                where = f" ({example['where']})" if example.get("where") else ""
                shown.append(f"<li>{_e(names[kind])}: eval #{example['eval_index']}{_e(where)}: {_e(example['text'])}</li>")
    listing = f"<ul class='note'>{''.join(shown)}</ul>" if shown else ""
    return (f'<section id="contamination"><h2>Train/eval overlap {badge}</h2>'
            f'<p class="note">{c.get("eval", 0)} held-out examples checked against {c.get("train", 0)} training examples '
            f"by normalised hash (case, whitespace and, for prompts and answers, punctuation folded).</p>"
            f'<table><thead><tr><th>overlap</th><th class="num">eval examples</th><th class="num">share</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{listing}</section>")


def _samples_section(data: RunData, limit: int = 6) -> str:
    present = [k for k in BASELINES if data.evals.get(k, {}).get("samples")]
    if not present:
        return ""
    first = data.evals[present[-1]]["samples"]
    blocks = []
    for i, sample in enumerate(first[:limit]):
        answers = []
        reference = sample.get("reference", "")
        answers.append(f'<div><div class="label">reference</div><pre>{_e(reference)}</pre></div>')
        for key in present:
            samples = data.evals[key]["samples"]
            if i < len(samples):
                marks = _score_marks(samples[i].get("scores") or {})
                answers.append(f'<div><div class="label">{_e(BASELINE_TITLES[key])}{marks}</div>'
                               f'<pre>{_e(samples[i].get("prediction", ""))}</pre></div>')
        prompt = sample.get("prompt", "")
        preview = _prompt_preview(sample.get("question") or prompt)
        blocks.append(f'<div class="sample"><details><summary>#{i + 1} {_e(preview)}</summary><pre>{_e(prompt)}</pre></details>'
                      f'<div class="answers">{"".join(answers)}</div></div>')
    return (f'<section id="samples"><h2>Samples</h2><p class="note">The first {min(limit, len(first))} held-out '
            f"examples, greedy answers.</p>{''.join(blocks)}</section>")


_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>")
_ROLE_LINE = re.compile(r"^(system|user|assistant|model|human)\s*:?\s*$", re.IGNORECASE)


def _prompt_preview(prompt: str, limit: int = 140) -> str:
    """The last message of a templated prompt (the user's question, for chat templates) without template tokens."""
    for segment in reversed(_SPECIAL.split(prompt)):
        lines = [line.strip() for line in segment.splitlines()]
        lines = [line for line in lines if line and not _ROLE_LINE.match(line)]
        if lines:
            text = " ".join(lines)
            return text if len(text) <= limit else text[: limit - 1] + "…"
    return ""


def _score_marks(scores: dict) -> str:
    """Per-example metric values as short marks after a label: "exact_match ✓ · rouge_l 0.62"."""
    marks = []
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        text = "✓" if value == 1 else "✗" if value == 0 else f"{value:.2f}"
        css = "pos" if value == 1 else "neg" if value == 0 else ""
        marks.append(f'{_e(name)} <span class="{css}">{text}</span>')
    return f'<div class="marks">{" · ".join(marks)}</div>' if marks else ""


def _data_section(data: RunData) -> str:
    stats = data.data_stats
    if not stats:
        return ""
    rows = "".join(f"<tr><td>{_e(k.replace('_', ' '))}</td><td class='num'>{_e(_fmt(v) if not isinstance(v, int) else f'{v:,}')}</td></tr>"
                   for k, v in stats.items())
    return f'<section id="data"><h2>Data</h2><table><tbody>{rows}</tbody></table></section>'


def _environment_section(data: RunData) -> str:
    parts = []
    if data.recipe_text:
        parts.append(f"<h3>Resolved recipe (recipe.yaml)</h3><pre>{_e(data.recipe_text)}</pre>")
    env = data.environment
    if env:
        rows = [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in env.items() if not isinstance(v, dict)]
        rows += [f"<tr><td>{_e(k)}</td><td>{_e(v if v is not None else 'not installed')}</td></tr>"
                 for k, v in (env.get("versions") or {}).items()]
        parts.append(f"<h3>Environment</h3><table><tbody>{''.join(rows)}</tbody></table>")
    if not parts:
        return ""
    return f'<section id="setup"><h2>Recipe and environment</h2>{"".join(parts)}</section>'


def _header(data: RunData) -> str:
    recipe = data.recipe
    model = (recipe.get("model") or {}).get("name", "?") if isinstance(recipe.get("model"), dict) else recipe.get("model", "?")
    adapter = (recipe.get("adapter") or {}).get("type", "?")
    state = data.status.get("state", "unknown")
    started = data.status.get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else ""
    error = f'<div class="sub" style="color:var(--bad)">{_e(data.status["error"])}</div>' if data.status.get("error") else ""
    return (f'<header><div class="inner"><h1>{_e(data.name)} {_status_badge(state)}</h1>'
            f'<div class="sub">{_e(recipe.get("method", "?"))} · {_e(adapter)} · {_e(model)}'
            f'{" · " + _e(when) if when else ""} · {_e(data.path)}</div>{error}</div></header>')


def render_html(data: RunData, plots: dict[str, Path]) -> str:
    from tuneforge.report_rl import rl_section

    sections = [
        _headline(data), _results_section(data), rl_section(data, plots),
        _plots_section({k: v for k, v in plots.items() if k != "rl"}), _forgetting_section(data, plots),
        _judge_section(data), _early_stopping_section(data), _contamination_section(data), _samples_section(data),
        _data_section(data), _environment_section(data),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{_e(data.name)} · tuneforge report</title>'
            f"<style>{_CSS}</style></head><body>{_header(data)}<main>{''.join(s for s in sections if s)}"
            f"<footer>written by tuneforge report · {_e(time.strftime('%Y-%m-%d %H:%M'))}</footer></main></body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/plots/*.png and <run_dir>/report.html; returns the path of report.html."""
    data = load_run(run_dir)
    plots = make_plots(data, data.path / "plots")
    target = data.path / "report.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(render_html(data, plots), encoding="utf-8")
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs


def comparison_rows(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per run) for the comparison table, as plain strings."""

    def cell(fn):
        out = []
        for run in runs:
            try:
                out.append(fn(run))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError):
                out.append("–")
        return out

    def model(run):
        m = run.recipe.get("model")
        return m.get("name", "?") if isinstance(m, dict) else str(m)

    def final_train_loss(run):
        _, values = run.train_loss_series()
        return _fmt(values[-1], 4) if values else "–"

    def loss_cell(run):
        losses = run.eval_losses()
        if losses.get("tuned") is None:
            return "–"
        base = losses.get("base")
        return f"{losses['tuned']:.4f}" + (f" ({losses['tuned'] - base:+.4f})" if base is not None else "")

    rows = [
        ("status", cell(lambda r: r.status.get("state", "unknown"))),
        ("method", cell(lambda r: str(r.recipe.get("method", "?")))),
        ("model", cell(model)),
        ("adapter", cell(lambda r: str(r.recipe["adapter"]["type"]))),
        ("learning rate", cell(lambda r: f"{r.recipe['train']['lr']:g}")),
        ("steps", cell(lambda r: _fmt(r.summary.get("steps")))),
        ("train time", cell(lambda r: _duration(r.summary.get("train_seconds")))),
        ("final train loss", cell(final_train_loss)),
        ("held-out loss (Δ base)", cell(loss_cell)),
    ]
    names: list[str] = []
    for run in runs:
        for name in run.baseline_table():
            if name not in names:
                names.append(name)
    for name in names:
        def metric(run, name=name):
            values = run.baseline_table().get(name)
            if not values or values.get("tuned") is None:
                return "–"
            text = f"{values['tuned']:.1f}"
            if values.get("base") is not None:
                text += f" ({values['tuned'] - values['base']:+.1f})"
            return text

        def few(run, name=name):
            values = run.baseline_table().get(name) or {}
            return _fmt(values.get("few_shot"))

        rows.append((f"{name} tuned (Δ base)", cell(metric)))
        if any(run.baseline_table().get(name, {}).get("few_shot") is not None for run in runs):
            rows.append((f"{name} few-shot base", cell(few)))

    def forgetting(run):
        comparison = (run.forgetting or {}).get("comparison")
        if not comparison:
            return "–"
        acc = comparison["scores"].get("accuracy")
        text = f"{acc['delta']:+.1f}" if acc else "?"
        return text + (" FLAGGED" if comparison["flagged"] else "")

    rows.append(("forgetting probe Δ", cell(forgetting)))
    rows.append(("train/eval overlap", cell(lambda r: f"{r.contamination['exact']['count']} exact" if r.contamination else "–")))
    rows.append(("peak GPU memory", cell(lambda r: _fmt(r.summary.get("peak_memory_gb"), 1, " GB"))))
    return rows


def compare_runs(run_dirs: list[str | Path]):
    """A rich Table with one column per run: setup, losses, every metric (tuned and change vs base), forgetting."""
    from rich.table import Table

    runs = [load_run(d) for d in run_dirs]
    table = Table(title=f"comparison of {len(runs)} runs")
    table.add_column("")
    for run in runs:
        table.add_column(run.name if sum(r.name == run.name for r in runs) == 1 else str(run.path), justify="right")
    for label, cells in comparison_rows(runs):
        table.add_row(label, *cells)
    return table


def write_comparison(run_dirs: list[str | Path], output: str | Path) -> Path:
    """An HTML page comparing runs: the comparison table and their loss curves overlaid (self-contained)."""
    import tempfile

    runs = [load_run(d) for d in run_dirs]
    labels = [run.name if sum(r.name == run.name for r in runs) == 1 else str(run.path) for run in runs]
    rows = comparison_rows(runs)
    head = "".join(f'<th class="num">{_e(label)}</th>' for label in labels)
    body = "".join(f"<tr><td>{_e(label)}</td>{''.join(f'<td class=num>{_e(c)}</td>' for c in cells)}</tr>"
                   for label, cells in rows)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, title in (("loss", "Training loss"), ("eval_loss", "Held-out loss")):
            series = [(label, *(run.eval_loss_series() if key == "eval_loss" else run.series(key)))
                      for label, run in zip(labels, runs)]
            if not any(x for _, x, _ in series):
                continue
            figure = _figure(6.4, 3.6)
            axes = figure.add_subplot()
            for label, x, y in series:
                if x:
                    axes.plot(x, y, label=label, linewidth=1.6, marker="o" if len(x) <= 30 else None, markersize=4)
            _style(axes, title, ylabel="loss")
            axes.legend(fontsize=8, frameon=False)
            figures.append(_image(_save(figure, Path(tmp) / f"{key}.png"), title))
    plots = f'<section><h2>Curves</h2><div class="plots">{"".join(figures)}</div></section>' if figures else ""
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tuneforge run comparison</title>'
            f"<style>{_CSS}</style></head><body><header><div class='inner'><h1>Comparison of {len(runs)} runs</h1>"
            f"<div class='sub'>{_e(', '.join(str(r.path) for r in runs))}</div></div></header><main>"
            f"<section><h2>Runs</h2><table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table></section>"
            f"{plots}<footer>written by tuneforge report · {_e(time.strftime('%Y-%m-%d %H:%M'))}</footer></main></body></html>")
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
