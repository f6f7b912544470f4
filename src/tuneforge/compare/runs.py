"""The runs of a comparison: one recipe per method (the recipe's data, model, train budget and eval, with that
method's adapter: section), all checked before the first one trains, then each trained as its own `tuneforge train`
process into <output>/<method>.

Same budget: every method gets the recipe's train.* (steps or epochs, batch, max_length, seed) and eval.*; only the
learning rate and optimizer are left to each method's default (a learning rate tuned for LoRA is 150x too small for
prompt tuning and 10x too large for full fine-tuning; the defaults are the seeds' and papers', adapter_kinds.py).
A method whose run directory already holds a completed run is not trained again (delete it, or --overwrite).
Peak memory: the run's CUDA peak (summary.json) on a GPU; on CPU the training process's peak resident memory, read
from the kernel when the process ends (os.wait4), so each method is measured in a process of its own.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.errors import RecipeError


def _absolute_data(data: dict, recipe) -> None:
    from tuneforge.recipe import resolve_path

    section = data.get("data") or {}
    for key in ("train", "eval"):
        value = section.get(key)
        if isinstance(value, str):
            resolved = resolve_path(recipe, value)
            if resolved and Path(resolved).exists():
                section[key] = str(Path(resolved).resolve())
        elif isinstance(value, list):
            for source in value:
                if isinstance(source, dict) and isinstance(source.get("path"), str):
                    resolved = resolve_path(recipe, source["path"])
                    if resolved and Path(resolved).exists():
                        source["path"] = str(Path(resolved).resolve())


def method_recipes(recipe_path: str | Path, methods: list[str], overrides: list[str] | None = None) -> dict[str, dict]:
    """{method: recipe mapping}, each validated; every problem of every method in one RecipeError."""
    from tuneforge.compare.menu import adapter_for
    from tuneforge.recipe import apply_overrides, load_recipe, parse_recipe
    from tuneforge.recipe_yaml import read_recipe_file

    path = Path(recipe_path)
    base = load_recipe(path, overrides)  # the recipe itself must be valid first
    _, data = read_recipe_file(path)
    data = apply_overrides(data, list(overrides or []))
    if data.get("stages") or data.get("federated"):
        raise RecipeError(["compare runs one training per method: a recipe with stages: or federated: is not "
                           "compared; compare its stages' recipes one by one"], source=str(path))
    _absolute_data(data, base)
    out, problems = {}, []
    for method in methods:
        item = copy.deepcopy(data)
        item["adapter"] = adapter_for(method)
        item["name"] = f"{base.name}-{method}"
        train = item.setdefault("train", {})
        train.pop("lr", None)
        train.pop("optimizer", None)
        try:
            parse_recipe(copy.deepcopy(item), source=f"{path} [{method}]")
        except RecipeError as exc:
            problems += [f"{method}: {p}" for p in exc.problems]
            continue
        out[method] = item
    if problems:
        raise RecipeError(problems, source=str(path))
    return out


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state") == "completed" and \
            (run_dir / "summary.json").exists()
    except (OSError, ValueError):
        return False


def run_method(method: str, recipe: dict, output: Path, *, overwrite: bool = False, doctor: bool = True,
               console=None, previous: dict | None = None) -> dict:
    """Train one method in its own process; returns {method, run, status, seconds, peak_rss_gb, log}."""
    import yaml

    output.mkdir(parents=True, exist_ok=True)
    run_dir = output / method
    recipe_file = output / "recipes" / f"{method}.yaml"
    recipe_file.parent.mkdir(exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    log = output / "logs" / f"{method}.log"
    log.parent.mkdir(exist_ok=True)
    record = {"method": method, "run": str(run_dir), "log": str(log), "recipe": str(recipe_file)}
    if _completed(run_dir) and not overwrite:
        previous = previous or {}
        return {**record, "status": "completed", "reused": True, "seconds": previous.get("seconds"),
                "peak_rss_gb": previous.get("peak_rss_gb")}
    cmd = [sys.executable, "-m", "tuneforge", "train", str(recipe_file), "--output", str(run_dir)]
    cmd += ["--overwrite"] if run_dir.exists() else []
    cmd += [] if doctor else ["--no-doctor"]
    started = time.time()
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - started
    peak_rss_gb = usage.ru_maxrss * 1024 / 2**30  # Linux reports kilobytes
    ok = proc.returncode == 0 and _completed(run_dir)
    tail = "" if ok else " ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
    if console is not None:
        console.print(f"[bold]{method}[/] {'done' if ok else '[red]failed[/]'} in {seconds:.0f}s" +
                      ("" if ok else f": {tail}"), highlight=False)
    return {**record, "status": "completed" if ok else "failed", "reused": False, "seconds": round(seconds, 1),
            "peak_rss_gb": round(peak_rss_gb, 3), **({} if ok else {"error": tail})}


def _previous_records(output: Path) -> dict[str, dict]:
    """What an earlier comparison in this folder measured of each method (kept when its run is reused)."""
    try:
        data = json.loads((output / "compare.json").read_text())
        return {r["method"]: r for r in data.get("methods", []) if r.get("status") == "completed"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_comparison(recipe_path, methods: list[str], output: str | Path, *, overrides: list[str] | None = None,
                   overwrite: bool = False, doctor: bool = True, console=None) -> dict:
    """Check every method's recipe, train each, and write the report; returns the report's data."""
    from tuneforge.compare.report import collect, write_report

    recipes = method_recipes(recipe_path, methods, overrides)
    output = Path(output)
    command = " ".join(["tuneforge", "compare", str(recipe_path), "--methods", ",".join(methods), "--output",
                        str(output), *[f"--set {o}" for o in overrides or []], *([] if doctor else ["--no-doctor"])])
    records, report, previous = [], None, _previous_records(output)
    for method in methods:
        if console is not None:
            console.print(f"[bold]compare[/] {method} ({len(records) + 1}/{len(methods)})", highlight=False)
        records.append(run_method(method, recipes[method], output, overwrite=overwrite, doctor=doctor,
                                  console=console, previous=previous.get(method)))
        # the report so far after each method: a long comparison stopped part-way still has its finished rows
        report = collect(records, recipe=str(recipe_path), command=command)
        write_report(report, output)
    return report
