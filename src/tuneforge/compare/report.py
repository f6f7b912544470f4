"""The comparison report: one row per method from its run's summary.json and recipe.yaml, written as compare.json,
compare.md, compare.html and compare.png (matplotlib) in the comparison's folder.

Columns: the adapter type and the learning rate it ran with; trainable parameters (and their share); the saved
artifact's size on disk (adapter/ or model/ weights); peak memory (CUDA's peak on a GPU, else the training process's
peak resident memory); seconds per optimizer step; the first task metric for the base, the few-shot prompt and the
tuned model, with the tuned - base and tuned - few-shot differences and their 95% intervals (evaluate/intervals.py);
the held-out loss after training and its change from the base model's (per-example losses of the base measured
before any adapter is attached: a soft prompt's random start is not "the base"); the general-ability probe's change (forgetting; negative = forgot).
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def _weights_bytes(run_dir: Path) -> int | None:
    for name in ("adapter", "model"):
        folder = run_dir / name
        if folder.is_dir():
            return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return None


def _read(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def row_for(record: dict) -> dict:
    """One method's row (status failed: only the error)."""
    run_dir = Path(record["run"])
    row = {"method": record["method"], "status": record["status"], "run": record["run"]}
    if record["status"] != "completed":
        return {**row, "error": record.get("error", "")}
    import yaml

    summary = _read(run_dir / "summary.json", {})
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    adapter, train = recipe.get("adapter", {}), recipe.get("train", {})
    steps = summary.get("steps") or 0
    cuda_peak = summary.get("peak_memory_gb")
    metrics = summary.get("metrics") or {}
    metric = next(iter(metrics), None)
    values = metrics.get(metric, {}) if metric else {}
    forgetting = (summary.get("forgetting") or {}).get("accuracy") or {}
    loss = summary.get("eval_loss") or {}
    size = _weights_bytes(run_dir)
    return {
        **row,
        "type": adapter.get("type"), "lr": train.get("lr"), "optimizer": train.get("optimizer"), "steps": steps,
        "trainable_params": summary.get("trainable_params"), "total_params": summary.get("total_params"),
        "trainable_pct": (100 * summary["trainable_params"] / summary["total_params"]
                          if summary.get("trainable_params") and summary.get("total_params") else None),
        "artifact_mb": size / 2**20 if size is not None else None,
        "peak_memory_gb": cuda_peak if cuda_peak is not None else record.get("peak_rss_gb"),
        "peak_memory_kind": "cuda" if cuda_peak is not None else "rss",
        "step_seconds": summary.get("train_seconds", 0) / steps if steps else None,
        "metric": metric, "base": values.get("base"), "few_shot": values.get("few_shot"), "tuned": values.get("tuned"),
        "tuned_vs_base": values.get("tuned_vs_base"), "tuned_vs_few_shot": values.get("tuned_vs_few_shot"),
        "eval_loss_base": loss.get("base"), "eval_loss_tuned": loss.get("tuned"), "eval_loss_delta": loss.get("delta"),
        "eval_loss_ci95": loss.get("ci95"),
        "forgetting_delta": forgetting.get("delta"), "forgetting_ci95": forgetting.get("ci95"),
        "forgetting_flagged": (summary.get("forgetting") or {}).get("flagged"),
        "n_eval": summary.get("n_eval"),
    }


def collect(records: list[dict], *, recipe: str, command: str) -> dict:
    import platform

    return {"recipe": recipe, "command": command, "machine": platform.platform(), "methods": records,
            "rows": [row_for(r) for r in records]}


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _num(value, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _delta(entry) -> str:
    if not entry:
        return "-"
    ci = entry.get("ci95")
    return f"{entry['delta']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


COLUMNS = ("method", "type", "lr", "trainable", "% trainable", "artifact MB", "peak mem GB", "s/step", "score base",
           "few-shot", "tuned", "tuned-base [95% CI]", "tuned-few-shot", "eval loss tuned (vs base)", "forgetting (probe pts)")


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        if r["status"] != "completed":
            out.append([r["method"], "failed: " + (r.get("error") or "")[:120]] + ["-"] * (len(COLUMNS) - 2))
            continue
        loss = ("-" if r["eval_loss_tuned"] is None else f"{r['eval_loss_tuned']:.3f}" +
                ("" if r["eval_loss_delta"] is None else f" ({r['eval_loss_delta']:+.3f})"))
        forgetting = "-" if r["forgetting_delta"] is None else f"{r['forgetting_delta']:+.1f}" + (
            " FLAG" if r.get("forgetting_flagged") else "")
        out.append([r["method"], r["type"] or "-", _num(r["lr"]), f"{r['trainable_params']:,}",
                    _num(r["trainable_pct"], "{:.3g}%"), _num(r["artifact_mb"], "{:.2f}"),
                    _num(r["peak_memory_gb"], "{:.2f}") + ("" if r["peak_memory_kind"] == "cuda" else " (RSS)"),
                    _num(r["step_seconds"], "{:.2f}"), _num(r["base"], "{:.1f}"), _num(r["few_shot"], "{:.1f}"),
                    _num(r["tuned"], "{:.1f}"), _delta(r["tuned_vs_base"]), _delta(r["tuned_vs_few_shot"]), loss,
                    forgetting])
    return out


def markdown(report: dict) -> str:
    rows = table_rows(report)
    metric = next((r["metric"] for r in report["rows"] if r.get("metric")), "score")
    lines = [f"# tuneforge compare: {Path(report['recipe']).name}", "",
             f"Command: `{report['command']}`", "",
             f"Scores are `{metric}` in percent on the held-out examples; peak memory is CUDA's peak on a GPU, else "
             "the training process's peak resident memory (RSS: the whole process, model and Python included); "
             "forgetting is the change of the general-ability probe's accuracy in points.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_html(report: dict, path: Path, plot: str | None) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(report))
    image = f'<p><img src="{html.escape(plot)}" style="max-width:100%"></p>' if plot else ""
    path.write_text(f"""<!doctype html><meta charset="utf-8"><title>tuneforge compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
<h1>tuneforge compare: {html.escape(Path(report['recipe']).name)}</h1>
<p><code>{html.escape(report['command'])}</code></p><table><tr>{head}</tr>{body}</table>{image}""", encoding="utf-8")


def plot(report: dict, path: Path) -> bool:
    rows = [r for r in report["rows"] if r["status"] == "completed"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable parameters (log)", [r["trainable_params"] or 0 for r in rows], True),
              ("artifact on disk (MB, log)", [r["artifact_mb"] or 0 for r in rows], True),
              ("peak memory (GB)", [r["peak_memory_gb"] or 0 for r in rows], False),
              ("seconds per step", [r["step_seconds"] or 0 for r in rows], False),
              ("held-out loss, tuned - base", [r["eval_loss_delta"] or 0 for r in rows], False),
              ("task score, tuned - base (points)", [(r["tuned_vs_base"] or {}).get("delta", 0) for r in rows], False)]
    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for axis, (title, values, log) in zip(axes.flat, panels):
        axis.barh(names, values, color="#4c72b0")
        axis.set_title(title, fontsize=10)
        axis.invert_yaxis()
        if log and any(v > 0 for v in values):
            axis.set_xscale("log")
        axis.tick_params(labelsize=8)
    figure.suptitle(f"tuneforge compare: {Path(report['recipe']).name}", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(report: dict, output: Path, stem: str = "compare") -> dict[str, Path]:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = {"json": output / f"{stem}.json", "md": output / f"{stem}.md", "html": output / f"{stem}.html",
             "png": output / f"{stem}.png"}
    files["json"].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files["md"].write_text(markdown(report), encoding="utf-8")
    has_plot = plot(report, files["png"])
    write_html(report, files["html"], files["png"].name if has_plot else None)
    if not has_plot:
        files.pop("png")
    return files
