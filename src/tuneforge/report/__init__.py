"""The run report: a run directory -> plots/*.png and one self-contained report.html (opens offline, images
embedded as base64), and the comparison of several runs (a rich table, and an HTML page).

What it reads (every file optional, so a running or failed run still gets a report):
  metrics.jsonl            rows with step and any of loss, learning_rate, grad_norm, tokens_per_s, eval_loss, eval_*
  summary.json             eval_loss {base, tuned}, metrics {name: {base, few_shot, tuned}}, steps, train_seconds, ...
  eval/baseline.json       base model zero-shot   {"metrics": {...}, "n", "samples": [{prompt, reference, prediction}]}
  eval/few_shot.json       base model, few-shot prompt (prompt-only baseline), same shape
  eval/tuned.json          tuned model, same shape
  eval/forgetting.json     {"before": run_probe(...), "after": run_probe(...), "comparison": compare(...)}
  eval/contamination.json  contamination_report(...)
  eval/early_stopping.json PlateauStopping.summary()
  eval/judge.json          {"pairwise": compare_answers(...), "grades": {name: grade_answers(...)}}
  eval/rewards.json        RL policy methods: held-out reward {"before", "after"}; eval/reward.json: reward models
  recipe.yaml, environment.json, status.json, data_stats.json

Modules: rundir (reading a run directory), plots (the PNG figures), html (shared page pieces), page (report.html),
compare (several runs side by side).
"""

from tuneforge.report.compare import compare_runs, comparison_rows, write_comparison
from tuneforge.report.page import render_html, write_report
from tuneforge.report.plots import make_plots
from tuneforge.report.rundir import RunData, load_run

__all__ = ["RunData", "compare_runs", "comparison_rows", "load_run", "make_plots", "render_html", "write_comparison",
           "write_report"]
