"""lm-evaluation-harness tasks as a forgetting check (`eval.lm_eval_tasks`), where `lm-eval` is installed.

The tasks run on the in-memory model before and after training, beside the shipped probe; each task's main score
(acc_norm, else acc, else exact_match, else its first metric) becomes one more row of the forgetting comparison
(`lm_eval:<task>`), flagged by the same threshold. Tasks need their datasets: hub tasks need the internet (or a
filled HF cache); `eval.lm_eval_include` names a folder of task YAMLs of your own (e.g. `dataset_path: json` with
local `data_files`), which works offline.
"""

from __future__ import annotations

import difflib

from tuneforge.errors import RecipeError

MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1")


def task_manager(recipe):
    from lm_eval.tasks import TaskManager

    from tuneforge.recipe import resolve_path

    include = resolve_path(recipe, recipe.eval.lm_eval_include)
    return TaskManager(include_path=include) if include else TaskManager()


def check_tasks(recipe):
    """Before the run directory exists: lm-eval installed and every task name known (with a did-you-mean)."""
    tasks = recipe.eval.lm_eval_tasks
    if not tasks:
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(["`eval.lm_eval_tasks`: lm-eval is not installed; pip install lm-eval, or remove the key "
                           "(the shipped forgetting probe runs either way)"])
    manager = task_manager(recipe)
    known = set(manager.all_tasks)
    problems = []
    for i, task in enumerate(tasks):
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "list them with `lm-eval ls tasks`"
            problems.append(f"`eval.lm_eval_tasks.{i}`: lm-eval has no task {task!r}; {hint}")
    if problems:
        raise RecipeError(problems)
    return manager


def main_score(metrics: dict) -> tuple[str, float] | None:
    """lm-eval's per-task result dict ("acc,none": 0.25, "acc_stderr,none": ...) -> (metric name, value in %)."""
    values = {key.split(",")[0]: value for key, value in metrics.items()
              if isinstance(value, (int, float)) and "stderr" not in key and key != "alias"}
    for name in MAIN_METRICS + tuple(values):
        if name in values:
            return name, 100.0 * float(values[name])
    return None


def run_tasks(model, tokenizer, recipe, manager=None, *, batch_size: int = 8) -> dict:
    """-> {task: {"metric": name, "score": %}} for the model as it is now (eval mode restored afterwards)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(recipe)
    was_training = model.training
    model.eval()  # dropout off while scoring
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = simple_evaluate(model=wrapped, tasks=list(recipe.eval.lm_eval_tasks), limit=recipe.eval.lm_eval_limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    finally:
        model.train(was_training)
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        score = main_score(metrics)
        if score is not None:
            out[task] = {"metric": score[0], "score": round(score[1], 2)}
    return out
