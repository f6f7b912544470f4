"""The RL part of the run report (report.py calls these): curves of reward, KL, entropy and value loss over steps
when metrics.jsonl has them, and the held-out before/after tables of eval/rewards.json (ppo, grpo, rloo, online_dpo)
and eval/reward.json (reward models).

Curves, by the keys TRL logs: reward = `reward` (GRPO/RLOO) or `objective/scores` (PPO, online DPO: the reward
model's score); KL = `kl` or `objective/kl`; entropy = `entropy` or `objective/entropy`; value loss = `loss/value_avg`
(PPO). Each reward function's mean (`rewards/<name>/mean`) is drawn beside the total.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward", "Reward", ("reward", "objective/scores", "objective/rlhf_reward")),
    ("kl", "KL to the reference", ("kl", "objective/kl")),
    ("entropy", "Entropy", ("entropy", "objective/entropy")),
    ("value_loss", "Value loss", ("loss/value_avg",)),
)


def rl_plots(data, plots_dir: Path) -> dict[str, Path]:
    """plots/rl.png: one panel per quantity logged (reward, KL, entropy, value loss); {} when none is."""
    from tuneforge.report import _COLORS, _figure, _line, _save, _style

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
    figure = _figure(4.2 * len(panels), 3.2)
    palette = [_COLORS["train"], _COLORS["eval"], "#5cb85c", "#e6a23c", "#8e44ad", "#8c8c8c"]
    for i, (title, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for j, (key, x, y) in enumerate(series):
            _line(axes, x, y, key, palette[j % len(palette)])
        _style(axes, title)
        if len(series) > 1:
            axes.legend(fontsize=7, frameon=False)
    return {"rl": _save(figure, plots_dir / "rl.png")}


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def rl_section(data, plots: dict[str, Path]) -> str:
    """HTML: held-out reward before/after (policy methods) or pairwise accuracy (reward models), and the curves."""
    from tuneforge.report import _e, _fmt, _image

    parts = []
    rewards = _read(data.path / "eval" / "rewards.json")
    if isinstance(rewards, dict) and rewards.get("before"):
        before, after = rewards["before"], rewards.get("after") or {}
        rows = [("mean reward", before.get("mean_reward"), after.get("mean_reward"), 3)]
        if before.get("accuracy") is not None:
            rows.append((f"accuracy % ({before.get('accuracy_reward')})", before.get("accuracy"), after.get("accuracy"), 1))
        for name, value in (before.get("per_reward") or {}).items():
            rows.append((f"{name} (mean)", value, (after.get("per_reward") or {}).get(name), 3))
        rows.append(("mean completion length (chars)", before.get("mean_length"), after.get("mean_length"), 1))
        body = "".join(
            f"<tr><td>{_e(label)}</td><td>{_fmt(b, digits)}</td><td>{_fmt(a, digits)}</td>"
            f"<td>{'' if a is None or b is None else f'{a - b:+.{digits}f}'}</td></tr>" for label, b, a, digits in rows)
        where = "held-out prompts" if before.get("held_out", True) else "training prompts (no held-out set)"
        parts.append(f"<h3>Reward on {before.get('n')} {where}, greedy completions</h3><table><tr><th></th>"
                     f"<th>start</th><th>tuned</th><th>change</th></tr>{body}</table>")
        samples = after.get("samples") or []
        if samples:
            items = "".join(f"<div class='sample'><pre>{_e(s['prompt'][-160:])}\n→ {_e(s['completion'])}</pre>"
                            f"reward {_fmt(s['reward'], 2)}</div>" for s in samples[:4])
            parts.append(f"<details><summary>tuned completions</summary>{items}</details>")
    pairs = _read(data.path / "eval" / "reward.json")
    if isinstance(pairs, dict) and pairs.get("before"):
        before, after = pairs["before"], pairs.get("after") or {}
        parts.append(f"<h3>Reward model: pairwise accuracy on {before.get('n')} held-out pairs</h3><table><tr><th></th>"
                     f"<th>untrained head</th><th>trained</th></tr>"
                     f"<tr><td>accuracy % (r(chosen) &gt; r(rejected))</td><td>{_fmt(before.get('accuracy'))}</td>"
                     f"<td>{_fmt(after.get('accuracy'))}</td></tr>"
                     f"<tr><td>mean margin</td><td>{_fmt(before.get('mean_margin'), 3)}</td>"
                     f"<td>{_fmt(after.get('mean_margin'), 3)}</td></tr></table>")
    kl = (data.summary or {}).get("kl")
    if kl:
        parts.append(f"<p>KL to the reference over {kl['n']} logged steps: first {_fmt(kl['first'], 4)}, last "
                     f"{_fmt(kl['last'], 4)}, max {_fmt(kl['max'], 4)}.</p>")
    if "rl" in plots:
        parts.append(_image(plots["rl"], "reward, KL, entropy and value loss over steps", wide=True))
    if not parts:
        return ""
    return "<section><h2>Reinforcement learning</h2>" + "".join(parts) + "</section>"
