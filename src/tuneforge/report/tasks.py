"""Report sections of the task-specific methods: classify (baselines, per-class precision/recall/F1 and the confusion
matrix, plotted) and rft (each round's acceptance rate and held-out reward, plotted). Each reads what its run wrote
(summary.json `classification` / `rft`) and is empty for every other run."""

from __future__ import annotations

from pathlib import Path

from tuneforge.report.html import esc, fmt, image
from tuneforge.report.plots import COLORS, new_figure, save_png, style_axes


def task_plots(data, plots_dir: Path) -> dict[str, Path]:
    out = {}
    classification = (data.summary or {}).get("classification")
    if classification and classification.get("confusion"):
        out["confusion"] = save_png(_confusion_figure(classification), plots_dir / "confusion.png")
    rounds = ((data.summary or {}).get("rft") or {}).get("rounds")
    if rounds:
        out["rft"] = save_png(_rounds_figure(rounds, (data.summary.get("rl") or {}).get("before")),
                              plots_dir / "rft.png")
    return out


def _confusion_figure(classification: dict):
    labels, matrix = classification["labels"], classification["confusion"]
    size = max(3.2, 0.6 * len(labels) + 2)
    figure = new_figure(size + 0.8, size)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", fontsize=9,
                      color="white" if top and value > top / 2 else "black")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("predicted", fontsize=9)
    axes.set_ylabel("true label", fontsize=9)
    axes.set_title("Confusion matrix (tuned)", fontsize=11, loc="left")
    return figure


def _rounds_figure(rounds: list[dict], before: dict | None):
    figure = new_figure(8.4, 3.2)
    acceptance = figure.add_subplot(1, 2, 1)
    x = [r["round"] for r in rounds]
    acceptance.plot(x, [r["acceptance_rate"] for r in rounds], marker="o", color=COLORS["train"])
    style_axes(acceptance, "Accepted samples per round", xlabel="round", ylabel="% of samples")
    reward = figure.add_subplot(1, 2, 2)
    xs = ([0] if before else []) + x
    ys = ([before["mean_reward"]] if before else []) + [(r.get("held_out") or {}).get("mean_reward") for r in rounds]
    reward.plot(xs, ys, marker="o", color=COLORS["eval"], label="held-out mean reward")
    style_axes(reward, "Held-out reward after each round", xlabel="round (0 = start)", ylabel="mean reward")
    for axes in (acceptance, reward):
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def task_sections(data, plots: dict[str, Path]) -> str:
    return _classification_section(data, plots) + _rft_section(data, plots)


def _classification_section(data, plots: dict[str, Path]) -> str:
    summary = data.summary or {}
    info = summary.get("classification")
    if not info:
        return ""
    metrics = summary.get("metrics") or {}
    columns = [("majority", "majority class"), ("untrained_head", "untrained head"), ("zero_shot", "prompted zero-shot"),
               ("few_shot", "prompted few-shot"), ("tuned", "tuned")]
    present = [(k, t) for k, t in columns if any((metrics.get(m) or {}).get(k) is not None for m in metrics)]
    head = "".join(f'<th class="num">{esc(t)}</th>' for _, t in present)
    body = "".join(f"<tr><td>{esc(name)} (%)</td>" + "".join(f'<td class="num">{fmt(values.get(k))}</td>'
                                                               for k, _ in present) + "</tr>"
                   for name, values in metrics.items())
    per_class = "".join(
        f"<tr><td>{esc(label)}</td><td class='num'>{fmt(v['precision'])}</td><td class='num'>{fmt(v['recall'])}</td>"
        f"<td class='num'>{fmt(v['f1'])}</td><td class='num'>{v['support']}</td>"
        f"<td class='num'>{(info.get('train_counts') or {}).get(label, '–')}</td></tr>"
        for label, v in (info.get("per_class") or {}).items())
    weights = info.get("class_weights")
    notes = [f"{info.get('model_kind', '')}; base = {info.get('base_is', '')}",
             f"prompted baseline: {info.get('prompted_baseline', '')}",
             f"majority class: {info.get('majority_label')}"]
    if weights:
        notes.append("class-weighted loss: " + ", ".join(f"{l} {w:g}" for l, w in zip(info["labels"], weights)))
    if info.get("conflicting_labels"):
        notes.append(f"{info['conflicting_labels']} training text(s) appear with two labels (the later kept)")
    figure = image(plots["confusion"], "confusion matrix", "rows: true label, columns: the tuned model's prediction") \
        if "confusion" in plots else ""
    return (f"<section id='classification'><h2>Classification</h2><p class='note'>{esc('; '.join(notes))}</p>"
            f"<h3>Against the baselines</h3><table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table><h3>Per class (tuned)</h3><table><thead><tr><th>label</th><th class='num'>precision %</th>"
            f"<th class='num'>recall %</th><th class='num'>F1 %</th><th class='num'>held-out</th>"
            f"<th class='num'>training</th></tr></thead><tbody>{per_class}</tbody></table>"
            f"<h3>Confusion matrix</h3><div class='plots'>{figure}</div></section>")


def _rft_section(data, plots: dict[str, Path]) -> str:
    rft = (data.summary or {}).get("rft")
    if not rft or not rft.get("rounds"):
        return ""
    rows = "".join(
        f"<tr><td>{r['round']}</td><td class='num'>{r['prompts']}</td><td class='num'>{r['samples']}</td>"
        f"<td class='num'>{r['passing']}</td><td class='num'>{fmt(r['acceptance_rate'])}</td>"
        f"<td class='num'>{r['kept']}</td><td class='num'>{fmt(r['sample_mean_reward'], 3)}</td>"
        f"<td class='num'>{r['steps']}</td><td class='num'>{fmt((r.get('held_out') or {}).get('mean_reward'), 3)}</td>"
        f"<td class='num'>{fmt((r.get('held_out') or {}).get('accuracy'))}</td></tr>" for r in rft["rounds"])
    figure = image(plots["rft"], "rft rounds", "acceptance rate of the sampled answers and the held-out reward "
                   "(greedy) after each round", wide=True) if "rft" in plots else ""
    note = (f"{rft['samples_per_prompt']} samples per prompt at temperature {rft['temperature']:g}; kept: "
            f"{rft['keep']} (total reward ≥ {rft['threshold']:g})")
    return (f"<section id='rft'><h2>Rejection-sampling rounds</h2><p class='note'>{esc(note)}</p><table><thead><tr>"
            f"<th>round</th><th class='num'>prompts</th><th class='num'>samples</th><th class='num'>passing</th>"
            f"<th class='num'>acceptance %</th><th class='num'>kept</th><th class='num'>mean sample reward</th>"
            f"<th class='num'>SFT steps</th><th class='num'>held-out reward</th><th class='num'>held-out accuracy %</th>"
            f"</tr></thead><tbody>{rows}</tbody></table><div class='plots'>{figure}</div></section>")
