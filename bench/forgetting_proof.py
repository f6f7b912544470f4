"""A run built to forget, and the same run with each mitigation (issue #24's proof).

Full fine-tuning of the embedded SmolLM2-135M-Instruct at a high learning rate on narrow data (the quickstart's JSON
extraction task only) — then the same budget with 15% general replay (data mixing), with train.kl_to_base, and with
EWC. For each: the general probe's drop (536 items, with its 95% paired interval) and the task score (exact match on
the held-out task set, with its interval). CPU; writes bench/results/<date>-forgetting-cpu.{json,md,png}.

    .venv/bin/python bench/forgetting_proof.py [--steps 40] [--out /tmp/forgetting-proof]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "data" / "quickstart"


def recipe_for(name: str, steps: int, **changes) -> dict:
    recipe = {
        "name": name, "model": "embedded:smollm2-135m-instruct", "method": "sft",
        "data": {"train": str(TASK / "train.jsonl"), "eval": str(TASK / "eval.jsonl")},
        "adapter": {"type": "full"},
        "train": {"max_steps": steps, "batch_size": 8, "grad_accum": 1, "lr": 1e-4, "max_length": 256,
                  "scheduler": "constant", "warmup": 0, "seed": 0},
        "eval": {"max_examples": 40, "max_new_tokens": 64, "few_shot": 0, "forgetting": True},
    }
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


VARIANTS = {
    "built to forget": {},
    "+ replay 15%": {"data": {"train": [{"path": str(TASK / "train.jsonl"), "weight": 0.85},
                                        {"path": "builtin:general-replay", "weight": 0.15}]}},
    "+ kl_to_base 0.5": {"train": {"kl_to_base": 0.5}},
    "+ ewc lambda 1000": {"train": {"ewc": {"lambda": 1000.0, "fisher_examples": 64}}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="/tmp/forgetting-proof")
    args = parser.parse_args()
    from rich.console import Console

    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    rows = []
    for i, (label, changes) in enumerate(VARIANTS.items()):
        recipe = parse_recipe(recipe_for(f"variant{i}", args.steps, **changes))
        run = train(recipe, output=str(Path(args.out) / f"variant{i}"), overwrite=True, console=Console(), doctor=False)
        summary = run.read_json("summary.json")
        probe = summary["forgetting"]["accuracy"]
        task = summary["metrics"]["exact_match"]
        rows.append({"variant": label, "probe_before": probe["before"], "probe_after": probe["after"],
                     "probe_delta": probe["delta"], "probe_ci95": probe["ci95"], "flagged": summary["forgetting"]["flagged"],
                     "task_base": task["base"], "task_tuned": task["tuned"],
                     "task_delta": task["tuned_vs_base"]["delta"], "task_ci95": task["tuned_vs_base"]["ci95"],
                     "steps": summary["steps"], "train_seconds": summary["train_seconds"], "run": str(run.path)})
        print(json.dumps(rows[-1]), flush=True)
    stamp = datetime.date.today().isoformat()
    results = ROOT / "bench" / "results"
    (results / f"forgetting-{stamp}-cpu.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
    lines = [f"# Forgetting and its mitigations — embedded SmolLM2-135M-Instruct, CPU ({stamp})", "",
             f"Full fine-tuning, lr 1e-4 constant, {args.steps} steps x 8 examples of the quickstart JSON task only "
             "(`python bench/forgetting_proof.py`). Probe: 536 general multiple-choice items; task: exact match on "
             "40 held-out task examples. [brackets]: 95% paired-bootstrap interval.", "",
             "| variant | probe before → after | probe Δ [95% CI] | flagged | task base → tuned | task Δ [95% CI] |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['probe_before']:.1f} → {r['probe_after']:.1f} | {r['probe_delta']:+.1f} "
                     f"[{r['probe_ci95'][0]:+.1f}, {r['probe_ci95'][1]:+.1f}] | {'yes' if r['flagged'] else 'no'} | "
                     f"{r['task_base']:.1f} → {r['task_tuned']:.1f} | {r['task_delta']:+.1f} "
                     f"[{r['task_ci95'][0]:+.1f}, {r['task_ci95'][1]:+.1f}] |")
    (results / f"forgetting-{stamp}-cpu.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for r in rows:
        axis.errorbar(r["probe_delta"], r["task_delta"], xerr=[[r["probe_delta"] - r["probe_ci95"][0]],
                                                               [r["probe_ci95"][1] - r["probe_delta"]]],
                      yerr=[[r["task_delta"] - r["task_ci95"][0]], [r["task_ci95"][1] - r["task_delta"]]],
                      fmt="o", capsize=3, label=r["variant"])
    axis.axvline(0, color="grey", lw=0.5)
    axis.set_xlabel("general probe change (points)")
    axis.set_ylabel("task exact-match change (points)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(results / f"forgetting-{stamp}-cpu.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
