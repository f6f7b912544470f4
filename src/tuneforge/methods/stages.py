"""Multi-stage recipes (`stages: [{name: sft, method: sft}, {name: dpo, method: dpo, ...}]`): run the stages in
order, each a full run of its own in <run>/<stage name>/, each later stage starting from the one before it
(model.adapter = the previous stage's run directory, with model.adapter_mode as the stage says; a stage that sets
model.adapter itself keeps it). The parent folder holds the recipe as written (recipe.yaml) and stages.json.

`--resume` skips completed stages and resumes (or starts) the first unfinished one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import RunDirError


def train_stages(recipe, *, output=None, overwrite=False, console=None, resume=False, doctor=True):
    from tuneforge.recipe import recipe_to_yaml
    from tuneforge.run import RunDir
    from tuneforge.train import run_path_for, train

    parent = run_path_for(recipe, output)
    if not resume and parent.exists() and any(parent.iterdir()) and not overwrite:
        raise RunDirError(f"run directory {parent} already exists",
                          fix="pass --overwrite to replace it, --resume to continue it, or --output DIR for a new one")
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    stages = recipe.stage_recipes()
    record = {"stages": [{"name": s.name, "method": s.method, "run": s.name, "status": "pending"} for s in stages]}
    previous: Path | None = None
    last = None
    for i, (stage, entry) in enumerate(zip(stages, record["stages"])):
        path = parent / stage.name
        if previous is not None and not stage.model.adapter and (previous / "adapter").is_dir():
            stage.model.adapter = str(previous.resolve())
        elif previous is not None and (previous / "model").is_dir() and not stage.model.adapter:
            stage.model.name = str((previous / "model").resolve())  # a full fine-tuning stage hands on its weights
        console.print(f"[bold]stage {i + 1}/{len(stages)}[/] {stage.name} ({stage.method})"
                      + (f", from {stage.model.adapter}" if stage.model.adapter else ""))
        status = RunDir(path).status if (path / "status.json").exists() else None
        if resume and status == "completed":
            entry["status"] = "completed"
            last, previous = RunDir(path), path
            continue
        resumable = resume and (path / "checkpoints").is_dir() and any((path / "checkpoints").glob("checkpoint-*"))
        last = train(stage, output=str(path), overwrite=overwrite or (resume and not resumable), console=console,
                     resume=resumable, doctor=doctor)
        entry["status"] = last.status
        (parent / "stages.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        if last.status != "completed":
            break
        previous = path
    (parent / "stages.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return last
