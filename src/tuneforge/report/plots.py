"""The report's PNG plots (matplotlib, no pyplot): loss, learning rate, gradient norm, throughput, other logged
metrics, baselines, the forgetting probe, and the RL panel.

RL curves, by the keys TRL logs: reward = `reward` (GRPO/RLOO) or `objective/scores` (PPO, online DPO: the reward
model's score); KL = `kl` or `objective/kl`; entropy = `entropy` or `objective/entropy`; value loss = `loss/value_avg`
(PPO). Each reward function's mean (`rewards/<name>/mean`) is drawn beside the total.
"""

from __future__ import annotations

import math
from pathlib import Path

from tuneforge.evaluate.baselines import BASELINE_TITLES, BASELINES
from tuneforge.report.rundir import RunData

# metrics.jsonl keys that are bookkeeping, not curves worth plotting
_NOT_CURVES = {"step", "epoch", "time", "tokens_seen", "num_input_tokens_seen", "num_tokens", "total_flos",
               "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second",
               "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
               "eval_model_preparation_time", "eval_num_tokens", "eval_loss"}

COLORS = {"base": "#8c8c8c", "few_shot": "#e6a23c", "tuned": "#2f6fdf", "train": "#2f6fdf", "eval": "#d9534f",
           "before": "#8c8c8c", "after": "#2f6fdf"}


def new_figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure


def style_axes(axes, title: str, xlabel: str = "step", ylabel: str = ""):
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


def draw_line(axes, x, y, label, color, *, few_threshold: int = 30):
    axes.plot(x, y, label=label, color=color, linewidth=1.6, marker="o" if len(x) <= few_threshold else None,
              markersize=4)


def save_png(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return path


def make_plots(data: RunData, plots_dir: Path) -> dict[str, Path]:
    """Write the run's PNG plots; returns {name: path} for those that had data."""
    out: dict[str, Path] = {}
    train_x, train_y = data.train_loss_series()
    eval_x, eval_y = data.eval_loss_series()
    if train_x or eval_x:
        figure = new_figure()
        axes = figure.add_subplot()
        if train_x:
            draw_line(axes, train_x, train_y, "train loss", COLORS["train"])
        if eval_x:
            draw_line(axes, eval_x, eval_y, "eval loss", COLORS["eval"])
        style_axes(axes, "Loss", ylabel="loss")
        axes.legend(fontsize=8, frameon=False)
        out["loss"] = save_png(figure, plots_dir / "loss.png")
    for key, title, ylabel in (("learning_rate", "Learning rate", "lr"), ("grad_norm", "Gradient norm", "norm"),
                               ("tokens_per_s", "Throughput", "tokens / s")):
        x, y = data.series(key)
        if x:
            figure = new_figure()
            axes = figure.add_subplot()
            draw_line(axes, x, y, key, COLORS["train"])
            style_axes(axes, title, ylabel=ylabel)
            if key == "learning_rate":
                from matplotlib.ticker import FuncFormatter

                axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
            if key == "tokens_per_s":
                axes.set_ylim(bottom=0)  # small fluctuations should look small
            out[key] = save_png(figure, plots_dir / f"{key}.png")

    curves = _metric_curve_keys(data)
    if curves:
        columns = min(3, len(curves))
        rows = math.ceil(len(curves) / columns)
        figure = new_figure(4.0 * columns, 3.0 * rows)
        for i, key in enumerate(curves):
            axes = figure.add_subplot(rows, columns, i + 1)
            x, y = data.series(key)
            draw_line(axes, x, y, key, COLORS["eval"] if key.startswith("eval_") else COLORS["train"])
            style_axes(axes, key)
        out["metrics"] = save_png(figure, plots_dir / "metrics.png")

    table = data.baseline_table()
    if table:
        out["baselines"] = save_png(_baseline_figure(table), plots_dir / "baselines.png")

    comparison = (data.forgetting or {}).get("comparison")
    if comparison and (comparison.get("scores") or comparison.get("per_subject")):
        out["forgetting"] = save_png(_forgetting_figure(comparison), plots_dir / "forgetting.png")
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
    figure = new_figure(max(5.0, 1.6 * len(names) + 2.5), 3.6)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(present))
    for j, key in enumerate(present):
        xs = [i + (j - (len(present) - 1) / 2) * width for i in range(len(names))]
        values = [table[n].get(key) for n in names]
        bars = axes.bar(xs, [v or 0 for v in values], width * 0.95, label=BASELINE_TITLES[key], color=COLORS[key])
        for bar, value in zip(bars, values):
            if value is not None:
                axes.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    axes.set_xticks(range(len(names)), names, fontsize=9)
    axes.set_ylim(0, 105)
    style_axes(axes, "Held-out metrics: baselines vs tuned", xlabel="", ylabel="score (%)")
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
    figure = new_figure(max(6.0, 0.75 * len(labels) + 2), 3.6)
    axes = figure.add_subplot()
    xs = range(len(labels))
    axes.bar([x - 0.2 for x in xs], before, 0.38, label="before (base)", color=COLORS["before"])
    axes.bar([x + 0.2 for x in xs], after, 0.38, label="after (tuned)", color=COLORS["after"])
    for x, b, a in zip(xs, before, after):
        delta = a - b
        color = "#c0392b" if delta < -comparison.get("threshold", 5.0) else "#333333"
        axes.annotate(f"{delta:+.0f}", (x, max(a, b)), ha="center", va="bottom", fontsize=7, color=color,
                      xytext=(0, 2), textcoords="offset points")
    axes.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0, 110)
    style_axes(axes, "Forgetting probe: before vs after", xlabel="", ylabel="accuracy (%)")
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# RL: one panel per quantity logged

PANELS = (
    ("reward", "Reward", ("reward", "objective/scores", "objective/rlhf_reward")),
    ("kl", "KL to the reference", ("kl", "objective/kl")),
    ("entropy", "Entropy", ("entropy", "objective/entropy")),
    ("value_loss", "Value loss", ("loss/value_avg",)),
)


def rl_plots(data, plots_dir: Path) -> dict[str, Path]:
    """plots/rl.png: one panel per quantity logged (reward, KL, entropy, value loss); {} when none is."""
    panels = []
    for name, title, keys in PANELS:
        series = [(key, *data.series(key)) for key in keys]
        series = [(key, x, y) for key, x, y in series if x]
        if name == "reward":
            per = sorted({k for row in data.rows for k in row if k.startswith("rewards/") and k.endswith("/mean")})
            series += [(key, *data.series(key)) for key in per]
        if series:
            panels.append((title, series))
    if not panels:
        return {}
    figure = new_figure(4.2 * len(panels), 3.2)
    palette = [COLORS["train"], COLORS["eval"], "#5cb85c", "#e6a23c", "#8e44ad", "#8c8c8c"]
    for i, (title, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for j, (key, x, y) in enumerate(series):
            draw_line(axes, x, y, key, palette[j % len(palette)])
        style_axes(axes, title)
        if len(series) > 1:
            axes.legend(fontsize=7, frameon=False)
    return {"rl": save_png(figure, plots_dir / "rl.png")}
