"""Multi-stage recipes (`stages: [{name: sft, method: sft}, {name: dpo, method: dpo, ...}]`): run the stages in
order, each a full run of its own in <run>/<stage name>/, each later stage starting from the one before it
(model.adapter = the previous stage's run directory, with model.adapter_mode as the stage says; a stage that sets
model.adapter itself keeps it). The parent folder holds the recipe as written (recipe.yaml: the keys the user gave,
data paths made absolute, not the resolved defaults: a resolved SFT learning rate would otherwise override a later
DPO stage's default when the run is resumed) and stages.json.

`--resume` on the parent folder skips completed stages (they are not retrained), resumes the first unfinished stage
from its newest complete checkpoint with the recipe that stage saved (so a retry's smaller micro-batch holds), or
starts it afresh when it has no checkpoint yet; later stages follow as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import RunDirError


def train_stages(recipe, *, output=None, overwrite=False, console=None, resume=False, doctor=True):
    from tuneforge.checkpoints import complete_checkpoints
    from tuneforge.recipe import load_recipe
    from tuneforge.run import RunDir, check_output_path, mark_run_directory, replace_run_directory
    from tuneforge.run import run_path_for
    from tuneforge.train import train

    parent = run_path_for(recipe, output)
    stages = recipe.stage_recipes()
    if resume:
        if not (parent / "recipe.yaml").exists():
            raise RunDirError(f"{parent} is not a tuneforge run directory (no recipe.yaml)", fix="pass the run directory")
        done = [(parent / s.name / "status.json").exists() and RunDir(parent / s.name).status == "completed"
                for s in stages]
        if all(done):
            raise RunDirError(f"run {parent} already completed (every stage); nothing to resume",
                              fix="train a new run (--output) or add a stage in a new recipe")
    else:
        check_output_path(parent, overwrite=overwrite)  # --overwrite replaces only a marked run directory
        if parent.exists() and any(parent.iterdir()):
            replace_run_directory(parent, console)
    parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        mark_run_directory(parent)
        (parent / "recipe.yaml").write_text(as_written_yaml(recipe), encoding="utf-8")
    record = {"stages": [{"name": s.name, "method": s.method, "run": s.name, "status": "pending"} for s in stages]}
    previous: Path | None = None
    last = None
    for i, (stage, entry) in enumerate(zip(stages, record["stages"])):
        path = parent / stage.name
        if previous is not None and not stage.model.adapter and (previous / "adapter").is_dir():
            stage.model.adapter = str(previous.resolve())
        elif previous is not None and (previous / "model").is_dir() and not stage.model.adapter:
            stage.model.name = str((previous / "model").resolve())  # a full fine-tuning stage hands on its weights
        status = RunDir(path).status if (path / "status.json").exists() else None
        if resume and status == "completed":
            console.print(f"[bold]stage {i + 1}/{len(stages)}[/] {stage.name} ({stage.method}): completed, kept")
            entry["status"] = "completed"
            last, previous = RunDir(path), path
            continue
        resumable = resume and bool(complete_checkpoints(path / "checkpoints")) and (path / "recipe.yaml").exists()
        if resumable:  # the stage's own saved recipe: its resolved paths, start adapter and any oom_retry change
            stage = load_recipe(path / "recipe.yaml")
        console.print(f"[bold]stage {i + 1}/{len(stages)}[/] {stage.name} ({stage.method})"
                      + (f", from {stage.model.adapter}" if stage.model.adapter else "")
                      + (" (resuming)" if resumable else ""))
        try:
            last = train(stage, output=str(path), overwrite=overwrite or (resume and not resumable), console=console,
                         resume=resumable, doctor=doctor, stage=True)
        finally:
            entry["status"] = RunDir(path).status if (path / "status.json").exists() else "failed"
            _write_record(parent, record)
        if last.status != "completed":
            break
        previous = path
    _write_record(parent, record)
    return last


def _write_record(parent: Path, record: dict) -> None:
    target = parent / "stages.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    tmp.replace(target)


def as_written_yaml(recipe) -> str:
    """The multi-stage recipe as the user wrote it (with --set applied), data paths made absolute so the run can be
    resumed from any directory."""
    import copy

    import yaml

    from tuneforge.recipe import recipe_to_yaml, resolve_path

    base = recipe.stage_base
    if base is None:  # built in code without a mapping: the resolved form is all there is
        return recipe_to_yaml(recipe)
    written = copy.deepcopy(base)
    written["stages"] = copy.deepcopy(recipe.stages)
    for section in [written] + [s for s in written["stages"] if isinstance(s, dict)]:
        data = section.get("data")
        if not isinstance(data, dict):
            continue
        for key in ("train", "eval"):
            value = data.get(key)
            resolved = resolve_path(recipe, value) if isinstance(value, str) else None
            if resolved and Path(resolved).exists():
                data[key] = str(Path(resolved).resolve())
    return yaml.safe_dump(written, sort_keys=False, allow_unicode=True)
