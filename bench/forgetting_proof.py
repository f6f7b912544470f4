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
    parser.add_argument("--reuse", action="store_true", help="read finished variant runs under --out instead of "
                        "training them again (only the result files are rewritten)")
    args = parser.parse_args()
    from rich.console import Console

    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    rows, missing = [], []
    for i, (label, changes) in enumerate(VARIANTS.items()):
        folder = Path(args.out) / f"variant{i}"
        if args.reuse and (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
        elif args.reuse:  # not finished: the table says so rather than training it here
            print(f"{label}: no finished run under {folder}, left out", flush=True)
            missing.append(label)
            continue
        else:
            recipe = parse_recipe(recipe_for(f"variant{i}", args.steps, **changes))
            run = train(recipe, output=str(folder), overwrite=True, console=Console(), doctor=False)
            summary = run.read_json("summary.json")
        probe = summary["forgetting"]["accuracy"]
        task = summary["metrics"]["exact_match"]
        follow = summary["forgetting"].get("instructions") or {}
        rows.append({"variant": label, "probe_before": probe["before"], "probe_after": probe["after"],
                     "probe_delta": probe["delta"], "probe_ci95": probe["ci95"], "flagged": summary["forgetting"]["flagged"],
                     "instructions_before": follow.get("before"), "instructions_after": follow.get("after"),
                     "instructions_delta": follow.get("delta"), "instructions_ci95": follow.get("ci95"),
                     "instructions_n": follow.get("n"), "flag_message": summary["forgetting"].get("message"),
                     "task_base": task["base"], "task_tuned": task["tuned"],
                     "task_delta": task["tuned_vs_base"]["delta"], "task_ci95": task["tuned_vs_base"]["ci95"],
                     "steps": summary["steps"], "train_seconds": summary["train_seconds"], "run": str(folder)})
        print(json.dumps(rows[-1]), flush=True)
    stamp = datetime.date.today().isoformat()
    results = ROOT / "bench" / "results"
    (results / f"forgetting-{stamp}-cpu.json").write_text(json.dumps({"steps": args.steps, "rows": rows, "not_measured": missing}, indent=2))
    def interval(delta, ci):
        return "-" if delta is None else f"{delta:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"

    lines = [f"# Forgetting and its mitigations — embedded SmolLM2-135M-Instruct, CPU ({stamp})", "",
             f"Full fine-tuning, lr 1e-4 constant, {args.steps} steps x 8 examples of the quickstart JSON task only "
             "(`python bench/forgetting_proof.py`). The general probe (`eval.forgetting`) has two parts: 536 "
             "multiple-choice items scored by log-likelihood (MC) and a few instruction-following prompts checked "
             "by rule (instructions). Task: exact match on 40 held-out task examples. [brackets]: 95% paired-"
             "bootstrap interval; a run is flagged when an interval lies wholly below zero and the drop exceeds "
             "5 points.", "",
             "| variant | MC before → after | MC Δ [95% CI] | instructions before → after | instructions Δ [95% CI] "
             "| flagged | task base → tuned | task Δ [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        follow = "-" if r["instructions_before"] is None else \
            f"{r['instructions_before']:.1f} → {r['instructions_after']:.1f} (n={r['instructions_n']})"
        lines.append(f"| {r['variant']} | {r['probe_before']:.1f} → {r['probe_after']:.1f} | "
                     f"{interval(r['probe_delta'], r['probe_ci95'])} | {follow} | "
                     f"{interval(r['instructions_delta'], r['instructions_ci95'])} | {'yes' if r['flagged'] else 'no'} | "
                     f"{r['task_base']:.1f} → {r['task_tuned']:.1f} | {interval(r['task_delta'], r['task_ci95'])} |")
    lines += [f"| {label} | not measured (run unfinished) | | | | | | |" for label in missing]
    lines += ["", "Flag messages:", ""] + [f"- {r['variant']}: {r['flag_message'] or 'none'}" for r in rows]
    (results / f"forgetting-{stamp}-cpu.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, title in ((axes[0], "probe", "multiple-choice probe (536 items)"),
                             (axes[1], "instructions", "instruction-following probe")):
        for r in rows:
            delta, ci = r[f"{key}_delta"], r[f"{key}_ci95"]
            if delta is None:
                continue
            axis.errorbar(delta, r["task_delta"], xerr=[[delta - ci[0]], [ci[1] - delta]],
                          yerr=[[r["task_delta"] - r["task_ci95"][0]], [r["task_ci95"][1] - r["task_delta"]]],
                          fmt="o", capsize=3, label=r["variant"])
        axis.axvline(0, color="grey", lw=0.5)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("change after fine-tuning (points, 95% CI)")
    axes[0].set_ylabel("task exact-match change (points)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(results / f"forgetting-{stamp}-cpu.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
