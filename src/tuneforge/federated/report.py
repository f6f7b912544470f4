"""What a federated or per-tenant run shows: the split and each round on the terminal, the round scores in
TensorBoard, and report.html with the rounds plot (global score, each client's score and their spread, against
central training on pooled records and each client alone). Built from the report room's page pieces
(tuneforge.report.html, tuneforge.report.plots)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuneforge.federated import rounds as R


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_split(console, split, fed) -> None:
    from rich.table import Table

    how = fed.split + (f" on {fed.group_by}, alpha {fed.alpha}" if fed.split == "non_iid" else "")
    table = Table(title=f"{'tenants' if fed.mode == 'per_tenant' else 'clients'} ({how}); global held-out: "
                        f"{len(split.global_held_out)} records from {split.global_from}")
    for column in ("", "train", "held out", "groups"):
        table.add_column(column, justify="left" if column in ("", "groups") else "right")
    for shard in split.shards:
        groups = ", ".join(f"{k} {v}" for k, v in list(shard.groups.items())[:6])
        table.add_row(shard.name, str(len(shard.train)), str(len(shard.held_out)), groups)
    console.print(table)


def print_round(console, entry: dict, metric: str, rounds: int) -> None:
    value = R.score_of(entry["global"], metric)
    text = f"[bold]round {entry['round']}/{rounds}[/] global {metric} {_num(value, 4 if metric == 'eval_loss' else 1)}"
    if entry["round"] == 0:
        text += " (base model)"
    if entry.get("spread"):
        s = entry["spread"]
        text += f"; clients {_num(s['min'])}..{_num(s['max'])} (std {_num(s['std'])})"
    if entry.get("seconds") is not None:
        text += f"; {entry['seconds']:.0f} s"
    console.print(text)


def tensorboard_scalars(run, recipe, step: int, entry: dict, metric: str) -> None:
    """train.report_to: tensorboard -> the round's global and per-client scores under <run>/tensorboard."""
    if "tensorboard" not in recipe.train.report_to:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run.file("tensorboard")))
    try:
        value = R.score_of(entry.get("global"), metric)
        if value is not None:
            writer.add_scalar(f"global/{metric}", value, step)
        for name, result in (entry.get("clients") or {}).items():
            value = R.score_of(result, metric)
            if value is not None:
                writer.add_scalar(f"client/{name}/{metric}", value, step)
    finally:
        writer.close()


def print_summary(console, run, summary: dict) -> None:
    from rich.table import Table

    comparison = summary["federated"]["comparison"]
    metric = comparison["metric"]
    table = Table(title=f"{run.path.name}: global held-out {metric} ({summary['n_eval']} records)")
    table.add_column("")
    table.add_column(metric, justify="right")
    rows = [("base model", comparison["base"]), ("federated (global adapter)", comparison["federated"])]
    if not summary["federated"].get("baselines_not_run"):
        rows.append(("central, same budget", comparison["central"]))
    rows += [(f"{name} alone", value) for name, value in comparison["local"].items()]
    for label, value in rows:
        table.add_row(label, _num(value, 4 if metric == "eval_loss" else 1))
    console.print(table)
    if summary["federated"].get("baselines_not_run"):
        console.print(f"baselines: {summary['federated']['baselines_not_run']}")
    console.print(f"trained {summary['federated']['rounds']} rounds ({summary['steps']} client steps) in "
                  f"{summary['train_seconds']:.0f}s; run directory: {run.path}")


# ---------------------------------------------------------------------------------------------------------------
# The rounds plot and report.html


def plot_rounds(summary: dict, path: Path) -> Path | None:
    """Global score per round, each client's score on its own held-out records (thin) and their range (band), with
    central training and each client alone as horizontal references; the held-out loss beside it."""
    from tuneforge.report.plots import new_figure, save_png, style_axes

    fed = summary.get("federated") or {}
    history = fed.get("rounds_history") or []
    if not history:
        return None
    comparison, metric = fed.get("comparison") or {}, summary.get("primary_metric", "eval_loss")
    figure = new_figure(10.5, 3.8)
    score_axes, loss_axes = figure.subplots(1, 2)
    rounds = [e["round"] for e in history]
    score_axes.plot(rounds, [R.score_of(e["global"], metric) for e in history], color="#2f6fdf", marker="o",
                    linewidth=2, label="federated, global held-out")
    clients = sorted({k for e in history for k in e.get("clients", {})}, key=int)
    for k in clients:
        xs = [e["round"] for e in history if k in e.get("clients", {})]
        ys = [R.score_of(e["clients"][k], metric) for e in history if k in e.get("clients", {})]
        name = ((fed.get("split") or {}).get("clients") or [{}] * (int(k) + 1))[int(k)].get("name", k)
        score_axes.plot(xs, ys, linewidth=0.9, alpha=0.7, linestyle="-", marker=".", label=f"{name}, own held-out")
    banded = [e for e in history if e.get("spread")]
    if banded:
        score_axes.fill_between([e["round"] for e in banded], [e["spread"]["min"] for e in banded],
                                [e["spread"]["max"] for e in banded], color="#2f6fdf", alpha=0.08,
                                label="client spread (min-max)")
    if comparison.get("central") is not None:
        score_axes.axhline(comparison["central"], color="#1e8e3e", linestyle="--", linewidth=1.4,
                           label="central, same budget")
    for i, (name, value) in enumerate((comparison.get("local") or {}).items()):
        if value is not None:
            score_axes.axhline(value, color="#c0392b", linestyle=":", linewidth=1.1, alpha=0.8,
                               label="each client alone" if i == 0 else None)
    style_axes(score_axes, f"{metric} by round", xlabel="round", ylabel=metric)
    score_axes.legend(fontsize=7, loc="best")
    losses = [(e["round"], (e.get("global") or {}).get("eval_loss")) for e in history]
    losses = [(r, v) for r, v in losses if v is not None]
    if losses:
        loss_axes.plot([r for r, _ in losses], [v for _, v in losses], color="#d9534f", marker="o",
                       label="federated, global held-out")
        central = ((fed.get("baselines") or {}).get("central") or {}).get("global") or {}
        if central.get("eval_loss") is not None:
            loss_axes.axhline(central["eval_loss"], color="#1e8e3e", linestyle="--", label="central")
        loss_axes.legend(fontsize=7)
    style_axes(loss_axes, "held-out loss by round", xlabel="round", ylabel="loss")
    from matplotlib.ticker import MaxNLocator

    for axes in (score_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_png(figure, path)


def _table(head: list[str], rows: list[list[str]]) -> str:
    from tuneforge.report.html import esc

    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(run_path: Path, summary: dict, status: dict, plot: Path | None) -> str:
    from tuneforge.report.html import CSS, card, esc, fmt, image, status_badge

    fed, name = summary.get("federated") or {}, run_path.name
    parts = []
    if summary.get("mode") == "per_tenant":
        parts.append("<section><h2>Per-tenant adapters</h2>" + _table(
            ["tenant", "adapter", "train", "held out", "metric", "base", "tuned"],
            [[esc(t["name"]), esc(t["adapter"]), str(t["train"]), str(t["held_out"]), esc(m), fmt(v.get("base")),
              fmt(v.get("tuned"))] for t in summary.get("tenants", []) for m, v in (t.get("metrics") or {}).items()])
            + "</section>")
    else:
        c = fed.get("comparison") or {}
        digits = 4 if c.get("metric") == "eval_loss" else 1
        base = esc(f"base {fmt(c.get('base'), digits)}")
        cards = [card("federated " + str(c.get("metric")), fmt(c.get("federated"), digits), base),
                 card("central, same budget", fmt(c.get("central"), digits)),
                 card("best client alone", fmt(c.get("best_local"), digits)),
                 card("rounds", str(fed.get("rounds")), esc(f"{fed.get('clients')} clients, {fed.get('aggregation')}"))]
        parts.append(f'<div class="cards">{"".join(cards)}</div>')
        if plot is not None:
            parts.append(f'<section><h2>Rounds</h2><div class="plots">{image(plot, "rounds", wide=True)}</div>'
                         f'<p class="note">Global held-out score of the aggregated adapter after each round; thin lines: '
                         f"each client's score on its own held-out records; dashed: the same budget trained centrally "
                         f"on pooled records; dotted: each client trained alone.</p></section>")
        baselines, metric = fed.get("baselines") or {}, c.get("metric", "")
        compared = [["federated (global adapter)", str(summary.get("steps")), fmt(c.get("federated"), digits), "–"]]
        central = baselines.get("central") or {}
        if central:
            compared.append(["central, pooled records", str(central.get("steps")),
                             fmt(R.score_of(central.get("global"), metric), digits), "–"])
        for key, entry in (baselines.get("local") or {}).items():
            compared.append([esc(entry.get("name", key)) + " alone", str(entry.get("steps")),
                             fmt(R.score_of(entry.get("global"), metric), digits),
                             fmt(R.score_of(entry.get("own"), metric), digits)])
        if len(compared) > 1:
            parts.append("<section><h2>Comparison</h2>" + _table(
                ["model", "optimizer steps", f"global held-out {metric}", f"own held-out {metric}"], compared)
                + "</section>")
        if fed.get("baselines_not_run"):
            parts.append(f"<section><h2>Comparison</h2><p>Baselines (central, each client alone): "
                         f"{esc(fed['baselines_not_run'])}.</p><p>{esc(fed.get('records', ''))}</p></section>")
        rows = []
        for e in fed.get("rounds_history") or []:
            s = e.get("spread") or {}
            rows.append([str(e["round"]), fmt(R.score_of(e.get("global"), metric), digits),
                         fmt((e.get("global") or {}).get("eval_loss"), 4), fmt(s.get("min"), digits),
                         fmt(s.get("max"), digits), fmt(s.get("std"), digits), fmt(e.get("seconds"), 0)])
        parts.append("<section><h2>Per round</h2>" + _table(["round", "global", "global loss", "client min",
                                                             "client max", "client std", "seconds"], rows) + "</section>")
        split = fed.get("split") or {}
        parts.append("<section><h2>Clients</h2>" + _table(
            ["client", "train", "held out", "groups"],
            [[esc(k["name"]), str(k["train"]), str(k["held_out"]), esc(json.dumps(k.get("groups") or {}))]
             for k in split.get("clients", [])]) + "</section>")
        for title, key in (("Privacy", "privacy"), ("What crossed the client boundary", "traffic")):
            if fed.get(key):
                parts.append(f"<section><h2>{title}</h2><pre>{esc(json.dumps(fed[key], indent=1))}</pre></section>")
    state = status.get("state", "unknown")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(name)} · tuneforge federated'
            f'</title><style>{CSS}</style></head><body><header><div class="inner"><h1>{esc(name)} '
            f'{status_badge(state)}</h1><div class="sub">{esc(summary.get("mode"))} · {esc(fed.get("engine", ""))} · '
            f'{esc(run_path)}</div></div></header><main>{"".join(parts)}<footer>written by tuneforge federated · '
            f'{esc(time.strftime("%Y-%m-%d %H:%M"))}</footer></main></body></html>')


def write_federated_report(run_path) -> Path:
    run_path = Path(run_path)
    summary = json.loads((run_path / "summary.json").read_text(encoding="utf-8"))
    status_file = run_path / "status.json"
    status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.exists() else {}
    plot = plot_rounds(summary, run_path / "plots" / "federated_rounds.png") if summary.get("mode") == "federated" else None
    target = run_path / "report.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(render(run_path, summary, status, plot), encoding="utf-8")
    tmp.replace(target)
    return target
