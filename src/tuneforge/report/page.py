"""The run's report page: report.html, self-contained (plots embedded as base64), one section per thing the run
recorded (headline cards, held-out results, training curves, RL, forgetting, judge, early stopping, overlap,
samples, data, recipe and environment)."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from tuneforge.evaluate.baselines import BASELINE_TITLES, BASELINES
from tuneforge.evaluate.intervals import is_real_gain
from tuneforge.report.html import CSS, card, delta_cell, duration, esc, fmt, image, status_badge
from tuneforge.report.plots import make_plots
from tuneforge.report.rundir import RunData, load_run, read_json
from tuneforge.report.tasks import task_plots, task_sections


def _headline(data: RunData) -> str:
    cards = []
    losses = data.eval_losses()
    if losses.get("tuned") is not None:
        note = ""
        if losses.get("base") is not None:
            note = f"base {losses['base']:.4f} ({losses['tuned'] - losses['base']:+.4f})"
        cards.append(card("held-out loss", f"{losses['tuned']:.4f}", esc(note)))
    table = data.baseline_table()
    if table:
        name, values = next(iter(table.items()))
        tuned, base = values.get("tuned"), values.get("base")
        note = f"base {base:.1f}" if base is not None else ""
        if values.get("few_shot") is not None:
            note += f" · few-shot {values['few_shot']:.1f}"
        cards.append(card(name, fmt(tuned), esc(note)))
    comparison = (data.forgetting or {}).get("comparison")
    if comparison:
        badge = '<span class="badge bad">drop</span>' if comparison["flagged"] else '<span class="badge ok">ok</span>'
        scores = comparison.get("scores", {})
        shown = [k for k, v in scores.items() if v.get("flagged")] or [k for k in ("accuracy",) if k in scores]
        names = {"accuracy": "probe", "accuracy_norm": "probe (len-norm)", "instructions": "instructions"}
        note = "; ".join(f"{names.get(k, k)} {scores[k]['before']:.1f} → {scores[k]['after']:.1f}" for k in shown)
        cards.append(card("forgetting", badge, esc(note)))
    if data.contamination:
        c = data.contamination
        badge = '<span class="badge bad">overlap</span>' if c.get("contaminated") else '<span class="badge ok">none</span>'
        cards.append(card("train/eval overlap", badge, esc(f"{c['exact']['count']} exact, {c['prompt']['count']} prompt of {c['eval']}")))
    steps = data.summary.get("steps")
    if steps is None and data.rows:
        steps = max((r.get("step", 0) for r in data.rows), default=None)
    cards.append(card("steps", fmt(steps), esc(f"trained in {duration(data.summary.get('train_seconds'))}")))
    if data.summary.get("peak_memory_gb") is not None:
        cards.append(card("peak GPU memory", f"{data.summary['peak_memory_gb']:.1f} GB"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _results_section(data: RunData) -> str:
    table = data.baseline_table()
    losses = data.eval_losses()
    if not table and losses.get("tuned") is None and losses.get("base") is None:
        return ""
    present = [k for k in BASELINES if any(v.get(k) is not None for v in table.values()) or losses.get(k) is not None]
    head = "".join(f'<th class="num">{esc(BASELINE_TITLES[k])}</th>' for k in present)
    head += '<th class="num">tuned − base</th>' if "base" in present and "tuned" in present else ""
    head += '<th class="num">tuned − few-shot</th>' if "few_shot" in present and "tuned" in present else ""
    body = []
    for name, values in table.items():
        deltas = (data.summary.get("metrics") or {}).get(name) or {}
        cells = "".join(f'<td class="num">{fmt(values.get(k))}</td>' for k in present)
        if "base" in present and "tuned" in present:
            both = values.get("tuned") is not None and values.get("base") is not None
            cells += delta_cell(values["tuned"] - values["base"] if both else None,
                                ci=(deltas.get("tuned_vs_base") or {}).get("ci95"))
        if "few_shot" in present and "tuned" in present:
            both = values.get("tuned") is not None and values.get("few_shot") is not None
            cells += delta_cell(values["tuned"] - values["few_shot"] if both else None,
                                ci=(deltas.get("tuned_vs_few_shot") or {}).get("ci95"))
        body.append(f"<tr><td>{esc(name)} (%)</td>{cells}</tr>")
    for label, transform, digits in (("held-out loss", lambda v: v, 4), ("perplexity", _perplexity, 2)):
        if any(losses.get(k) is not None for k in present):
            values = {k: (transform(losses[k]) if losses.get(k) is not None else None) for k in present}
            cells = "".join(f'<td class="num">{fmt(values[k], digits)}</td>' for k in present)
            if "base" in present and "tuned" in present:
                both = values.get("tuned") is not None and values.get("base") is not None
                ci = (data.summary.get("eval_loss") or {}).get("ci95") if label == "held-out loss" else None
                cells += delta_cell(values["tuned"] - values["base"] if both else None, digits, lower_is_better=True,
                                    ci=ci)
            if "few_shot" in present and "tuned" in present:
                both = values.get("tuned") is not None and values.get("few_shot") is not None
                cells += delta_cell(values["tuned"] - values["few_shot"] if both else None, digits, lower_is_better=True)
            body.append(f"<tr><td>{label}</td>{cells}</tr>")
    n = data.summary.get("n_eval") or next((r.get("n") for r in data.evals.values() if r.get("n")), None)
    note = f"on {n} held-out examples" if n else ""
    if any("tuned_vs_base" in ((data.summary.get("metrics") or {}).get(k) or {}) for k in table):
        note += "; [brackets]: 95% interval of the difference (paired bootstrap over examples); a difference is " \
                "coloured only when its interval excludes zero"
    few = data.evals.get("few_shot", {}).get("shots")
    if few:
        note += f"; the few-shot baseline shows the base model {few} training examples first"
    verdict = ""
    for name, values in table.items():
        versus = ((data.summary.get("metrics") or {}).get(name) or {}).get("tuned_vs_few_shot")
        if versus is not None and not is_real_gain(versus):
            verdict = (f'<p class="note"><span class="badge warn">note</span> on {esc(name)} the tuned model is not '
                       f"clearly better than the prompt-only baseline (the interval of the difference reaches zero "
                       f"or below): a prompt may be all this task needs.</p>")
            break
        if versus is None and values.get("few_shot") is not None and values.get("tuned") is not None \
                and values["few_shot"] >= values["tuned"]:
            verdict = (f'<p class="note"><span class="badge warn">note</span> on {esc(name)} the prompt-only baseline '
                       f"matches or beats the tuned model: a prompt may be all this task needs.</p>")
            break
    return (f'<section id="results"><h2>Held-out results</h2><p class="note">{esc(note)}</p>'
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
    figures = [image(plots[k], k, captions.get(k, ""), wide=k in ("metrics", "baselines")) for k in order if k in plots]
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
        rows.append(f"<tr><td>{esc(names.get(key, key))}{flag}</td><td class='num'>{fmt(values['before'])}</td>"
                    f"<td class='num'>{fmt(values['after'])}</td>{delta_cell(values['delta'])}</tr>")
    for subject, values in comparison.get("per_subject", {}).items():
        rows.append(f"<tr><td>&nbsp;&nbsp;{esc(subject)}</td><td class='num'>{fmt(values['before'])}</td>"
                    f"<td class='num'>{fmt(values['after'])}</td>{delta_cell(values['delta'])}</tr>")
    n = (data.forgetting.get("before") or {}).get("n")
    lost, gained = comparison.get("lost", []), comparison.get("gained", [])
    extra = f"{len(lost)} items lost, {len(gained)} gained" + (f" (lost: {', '.join(lost[:12])})" if lost else "")
    figure = f'<div class="plots">{image(plots["forgetting"], "forgetting", wide=True)}</div>' if "forgetting" in plots else ""
    return (f'<section id="forgetting"><h2>Forgetting probe {badge}</h2>'
            f'<p class="note">{esc(comparison.get("message", ""))}. General-ability probe ({esc(n or "?")} multiple-choice '
            f"items scored by option log-likelihood, plus short instructions), base model before training vs tuned "
            f"model after. {esc(extra)}.</p>"
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
            f"<h3>Pairwise: {esc(y)} vs {esc(x)} ({pair['n']} prompts, each judged in both orders) {' '.join(bias)}</h3>"
            f"<table><tbody>"
            f"<tr><td>{esc(y)} wins / {esc(x)} wins / ties</td><td class='num'>{pair['wins'][y]} / {pair['wins'][x]} / {pair['wins']['tie']}</td></tr>"
            f"<tr><td>{esc(y)} win rate (ties count half)</td><td class='num'>{fmt(pair['win_rate'][y], 1, '%')}</td></tr>"
            f"<tr><td>same verdict in both orders (position consistency)</td><td class='num'>{fmt(_pct(pair.get('position_consistency')), 1, '%')}</td></tr>"
            f"<tr><td>verdicts for the answer shown first (0.5 = unbiased)</td><td class='num'>{fmt(pair.get('first_position_rate'), 2)}</td></tr>"
            f"<tr><td>decided pairs won by the longer answer</td><td class='num'>{fmt(pair.get('longer_preferred_rate'), 2)}</td></tr>"
            f"<tr><td>replies with no verdict</td><td class='num'>{pair.get('unparsed', 0)}</td></tr>"
            f"</tbody></table>")
    grades = data.judge.get("grades") or {}
    if grades:
        rows = "".join(f"<tr><td>{esc(name)}</td><td class='num'>{fmt(g.get('mean_score'), 2)}</td>"
                       f"<td class='num'>{fmt(g.get('length_correlation'), 2)}</td><td class='num'>{g.get('unparsed', 0)}</td></tr>"
                       for name, g in grades.items())
        parts.append("<h3>Rubric grades (1-10)</h3><table><thead><tr><th>model</th><th class='num'>mean score</th>"
                     "<th class='num'>score vs length (r)</th><th class='num'>unparsed</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    judge = data.judge.get("judge")
    note = f'<p class="note">judge: {esc(judge)}</p>' if judge else ""
    return f'<section id="judge"><h2>LLM judge</h2>{note}{"".join(parts)}</section>'


def _pct(value):
    return None if value is None else 100.0 * value


def _early_stopping_section(data: RunData) -> str:
    es = data.early_stopping
    if not es:
        return ""
    verdict = (f"stopped at step {es['stopped_at_step']}" if es.get("stopped_early")
               else "did not trigger (training ran its full length)")
    best = f"best {es.get('metric', 'eval_loss')} {fmt(es.get('best_value'), 4)} at step {fmt(es.get('best_step'))}"
    checkpoint = f"; best checkpoint: <code>{esc(es['best_checkpoint'])}</code>" if es.get("best_checkpoint") else ""
    return (f'<section id="early-stopping"><h2>Early stopping</h2><p>patience {esc(es.get("patience"))}, min delta '
            f'{esc(es.get("min_delta"))}: {esc(verdict)}; {esc(best)}{checkpoint}.</p></section>')


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
                    f"<td class='num'>{fmt(part.get('percent'))}%</td></tr>")
        for example in part.get("examples", [])[:3]:
            if kind != "answer":
                where = f" ({example['where']})" if example.get("where") else ""
                shown.append(f"<li>{esc(names[kind])}: eval #{example['eval_index']}{esc(where)}: {esc(example['text'])}</li>")
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
        answers.append(f'<div><div class="label">reference</div><pre>{esc(reference)}</pre></div>')
        for key in present:
            samples = data.evals[key]["samples"]
            if i < len(samples):
                marks = _score_marks(samples[i].get("scores") or {})
                answers.append(f'<div><div class="label">{esc(BASELINE_TITLES[key])}{marks}</div>'
                               f'<pre>{esc(samples[i].get("prediction", ""))}</pre></div>')
        prompt = sample.get("prompt", "")
        preview = _prompt_preview(sample.get("question") or prompt)
        blocks.append(f'<div class="sample"><details><summary>#{i + 1} {esc(preview)}</summary><pre>{esc(prompt)}</pre></details>'
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
        marks.append(f'{esc(name)} <span class="{css}">{text}</span>')
    return f'<div class="marks">{" · ".join(marks)}</div>' if marks else ""


def _data_section(data: RunData) -> str:
    stats = data.data_stats
    if not stats:
        return ""
    rows = "".join(f"<tr><td>{esc(k.replace('_', ' '))}</td><td class='num'>{esc(fmt(v) if not isinstance(v, int) else f'{v:,}')}</td></tr>"
                   for k, v in stats.items())
    return f'<section id="data"><h2>Data</h2><table><tbody>{rows}</tbody></table></section>'


def _environment_section(data: RunData) -> str:
    parts = []
    if data.recipe_text:
        parts.append(f"<h3>Resolved recipe (recipe.yaml)</h3><pre>{esc(data.recipe_text)}</pre>")
    env = data.environment
    if env:
        rows = [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in env.items() if not isinstance(v, dict)]
        rows += [f"<tr><td>{esc(k)}</td><td>{esc(v if v is not None else 'not installed')}</td></tr>"
                 for k, v in (env.get("versions") or {}).items()]
        parts.append(f"<h3>Environment</h3><table><tbody>{''.join(rows)}</tbody></table>")
    if not parts:
        return ""
    return f'<section id="setup"><h2>Recipe and environment</h2>{"".join(parts)}</section>'


def _rl_section(data, plots: dict[str, Path]) -> str:
    """HTML: held-out reward before/after (policy methods) or pairwise accuracy (reward models), and the curves."""
    parts = []
    rewards = read_json(data.path / "eval" / "rewards.json")
    if isinstance(rewards, dict) and rewards.get("before"):
        before, after = rewards["before"], rewards.get("after") or {}
        rows = [("mean reward", before.get("mean_reward"), after.get("mean_reward"), 3)]
        if before.get("accuracy") is not None:
            rows.append((f"accuracy % ({before.get('accuracy_reward')})", before.get("accuracy"), after.get("accuracy"), 1))
        for name, value in (before.get("per_reward") or {}).items():
            rows.append((f"{name} (mean)", value, (after.get("per_reward") or {}).get(name), 3))
        rows.append(("mean completion length (chars)", before.get("mean_length"), after.get("mean_length"), 1))
        body = "".join(
            f"<tr><td>{esc(label)}</td><td>{fmt(b, digits)}</td><td>{fmt(a, digits)}</td>"
            f"<td>{'' if a is None or b is None else f'{a - b:+.{digits}f}'}</td></tr>" for label, b, a, digits in rows)
        where = "held-out prompts" if before.get("held_out", True) else "training prompts (no held-out set)"
        parts.append(f"<h3>Reward on {before.get('n')} {where}, greedy completions</h3><table><tr><th></th>"
                     f"<th>start</th><th>tuned</th><th>change</th></tr>{body}</table>")
        samples = after.get("samples") or []
        if samples:
            items = "".join(f"<div class='sample'><pre>{esc(s['prompt'][-160:])}\n→ {esc(s['completion'])}</pre>"
                            f"reward {fmt(s['reward'], 2)}</div>" for s in samples[:4])
            parts.append(f"<details><summary>tuned completions</summary>{items}</details>")
    pairs = read_json(data.path / "eval" / "reward.json")
    if isinstance(pairs, dict) and pairs.get("before"):
        before, after = pairs["before"], pairs.get("after") or {}
        parts.append(f"<h3>Reward model: pairwise accuracy on {before.get('n')} held-out pairs</h3><table><tr><th></th>"
                     f"<th>untrained head</th><th>trained</th></tr>"
                     f"<tr><td>accuracy % (r(chosen) &gt; r(rejected))</td><td>{fmt(before.get('accuracy'))}</td>"
                     f"<td>{fmt(after.get('accuracy'))}</td></tr>"
                     f"<tr><td>mean margin</td><td>{fmt(before.get('mean_margin'), 3)}</td>"
                     f"<td>{fmt(after.get('mean_margin'), 3)}</td></tr></table>")
    kl = (data.summary or {}).get("kl")
    if kl:
        parts.append(f"<p>KL to the reference over {kl['n']} logged steps: first {fmt(kl['first'], 4)}, last "
                     f"{fmt(kl['last'], 4)}, max {fmt(kl['max'], 4)}.</p>")
    if "rl" in plots:
        parts.append(image(plots["rl"], "reward, KL, entropy and value loss over steps", wide=True))
    if not parts:
        return ""
    return "<section><h2>Reinforcement learning</h2>" + "".join(parts) + "</section>"


def _header(data: RunData) -> str:
    recipe = data.recipe
    model = (recipe.get("model") or {}).get("name", "?") if isinstance(recipe.get("model"), dict) else recipe.get("model", "?")
    adapter = (recipe.get("adapter") or {}).get("type", "?")
    state = data.status.get("state", "unknown")
    started = data.status.get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else ""
    error = f'<div class="sub" style="color:var(--bad)">{esc(data.status["error"])}</div>' if data.status.get("error") else ""
    return (f'<header><div class="inner"><h1>{esc(data.name)} {status_badge(state)}</h1>'
            f'<div class="sub">{esc(recipe.get("method", "?"))} · {esc(adapter)} · {esc(model)}'
            f'{" · " + esc(when) if when else ""} · {esc(data.path)}</div>{error}</div></header>')


def render_html(data: RunData, plots: dict[str, Path]) -> str:
    sections = [
        _headline(data), _results_section(data), task_sections(data, plots), _rl_section(data, plots),
        _plots_section({k: v for k, v in plots.items() if k not in ("rl", "confusion", "rft")}),
        _forgetting_section(data, plots),
        _judge_section(data), _early_stopping_section(data), _contamination_section(data), _samples_section(data),
        _data_section(data), _environment_section(data),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{esc(data.name)} · tuneforge report</title>'
            f"<style>{CSS}</style></head><body>{_header(data)}<main>{''.join(s for s in sections if s)}"
            f"<footer>written by tuneforge report · {esc(time.strftime('%Y-%m-%d %H:%M'))}</footer></main></body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/plots/*.png and <run_dir>/report.html; returns the path of report.html."""
    data = load_run(run_dir)
    plots = make_plots(data, data.path / "plots")
    plots.update(task_plots(data, data.path / "plots"))  # classify's confusion matrix, rft's rounds
    target = data.path / "report.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(render_html(data, plots), encoding="utf-8")
    tmp.replace(target)
    return target
