"""Comparing runs: one column per run (setup, losses, every metric with its change vs base, forgetting), as a rich
table for the terminal or a self-contained HTML page with the loss curves overlaid."""

from __future__ import annotations

import time
from pathlib import Path

from tuneforge.report.html import CSS, duration, esc, fmt, image
from tuneforge.report.plots import new_figure, save_png, style_axes
from tuneforge.report.rundir import RunData, load_run


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
        return fmt(values[-1], 4) if values else "–"

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
        ("steps", cell(lambda r: fmt(r.summary.get("steps")))),
        ("train time", cell(lambda r: duration(r.summary.get("train_seconds")))),
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
            return fmt(values.get("few_shot"))

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
    rows.append(("peak GPU memory", cell(lambda r: fmt(r.summary.get("peak_memory_gb"), 1, " GB"))))
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
    head = "".join(f'<th class="num">{esc(label)}</th>' for label in labels)
    body = "".join(f"<tr><td>{esc(label)}</td>{''.join(f'<td class=num>{esc(c)}</td>' for c in cells)}</tr>"
                   for label, cells in rows)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, title in (("loss", "Training loss"), ("eval_loss", "Held-out loss")):
            series = [(label, *(run.eval_loss_series() if key == "eval_loss" else run.series(key)))
                      for label, run in zip(labels, runs)]
            if not any(x for _, x, _ in series):
                continue
            figure = new_figure(6.4, 3.6)
            axes = figure.add_subplot()
            for label, x, y in series:
                if x:
                    axes.plot(x, y, label=label, linewidth=1.6, marker="o" if len(x) <= 30 else None, markersize=4)
            style_axes(axes, title, ylabel="loss")
            axes.legend(fontsize=8, frameon=False)
            figures.append(image(save_png(figure, Path(tmp) / f"{key}.png"), title))
    plots = f'<section><h2>Curves</h2><div class="plots">{"".join(figures)}</div></section>' if figures else ""
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tuneforge run comparison</title>'
            f"<style>{CSS}</style></head><body><header><div class='inner'><h1>Comparison of {len(runs)} runs</h1>"
            f"<div class='sub'>{esc(', '.join(str(r.path) for r in runs))}</div></div></header><main>"
            f"<section><h2>Runs</h2><table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table></section>"
            f"{plots}<footer>written by tuneforge report · {esc(time.strftime('%Y-%m-%d %H:%M'))}</footer></main></body></html>")
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
