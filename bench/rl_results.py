"""Summarise reward-model / RL proof runs for bench/results/rl-cpu.txt: held-out numbers before and after, the
reward curve and the KL over training, read from the run directories (summary.json, eval/, metrics.jsonl).

    python bench/rl_results.py runs/rl-proof-reward runs/rl-proof-grpo runs/rl-proof-ppo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def describe(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    recipe = (run / "recipe.yaml").read_text()
    method = next(line.split(":", 1)[1].strip() for line in recipe.splitlines() if line.startswith("method:"))
    out = [f"== {run.name} (method {method}): {summary['steps']} steps in {summary['train_seconds']:.0f} s"]
    if summary.get("reward_model"):
        before, after = summary["reward_model"]["before"], summary["reward_model"]["after"]
        out.append(f"held-out pairwise accuracy on {after['n']} pairs: untrained head {before['accuracy']:.1f}% "
                   f"(margin {before['mean_margin']:+.4f}) -> trained {after['accuracy']:.1f}% "
                   f"(margin {after['mean_margin']:+.4f}); chance 50%")
    if summary.get("rl"):
        before, after = summary["rl"]["before"], summary["rl"]["after"]
        out.append(f"held-out reward on {after['n']} prompts (greedy): mean {before['mean_reward']:.3f} -> "
                   f"{after['mean_reward']:.3f}")
        if before.get("accuracy") is not None:
            out.append(f"accuracy ({before['accuracy_reward']}): {before['accuracy']:.1f}% -> {after['accuracy']:.1f}%")
        for name, value in before["per_reward"].items():
            out.append(f"  {name}: {value:.3f} -> {after['per_reward'][name]:.3f}")
    curve = [(r["step"], r[k]) for r in rows(run) for k in ("reward", "objective/scores") if k in r]
    if curve:
        out.append("training reward per step: " + ", ".join(f"{s}:{v:.3f}" for s, v in curve))
    kl = [(r["step"], r[k]) for r in rows(run) for k in ("kl", "objective/kl") if k in r]
    if kl:
        out.append("KL to the reference per step: " + ", ".join(f"{s}:{v:.4f}" for s, v in kl))
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(describe(Path(p)) for p in sys.argv[1:]))
