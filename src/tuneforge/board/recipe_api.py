"""Routes of the recipe builder: the form (from the schema), live validation (`parse_recipe`, as the CLI), doctor's
findings and the plan's memory/time table for what the form holds, the recommend questionnaire, and launching the
recipe as `tuneforge train` (a separate process; see jobs.py)."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter
from pydantic import BaseModel, Field

from tuneforge.board import form
from tuneforge.board.state import BoardError, BoardState


class RecipeBody(BaseModel):
    values: dict[str, Any] = Field(default_factory=dict)
    extras: str = ""
    gpu: Optional[str] = None
    overwrite: bool = False


class YamlBody(BaseModel):
    yaml: str


class AnswersBody(BaseModel):
    answers: dict[str, Any] = Field(default_factory=dict)


def code_keys(data: dict) -> list[str]:
    """Keys of a recipe (and its stages) that run code from files or from the model's repository."""
    keys = []
    if not isinstance(data, dict):
        return keys
    model = data.get("model")
    if isinstance(model, dict) and model.get("trust_remote_code"):
        keys.append("model.trust_remote_code")
    for section, key in (("eval", "metrics"), ("rl", "rewards")):
        items = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        for i, item in enumerate(items or []):
            if isinstance(item, dict) and item.get("name") == "custom":
                keys.append(f"{section}.{key}.{i}")
    for i, stage in enumerate(data.get("stages") or []):
        keys += [f"stages.{i}.{k}" for k in code_keys(stage)]
    return keys


def _checked(state: BoardState, body: RecipeBody) -> dict:
    """The form's recipe, valid (else BoardError listing the problems), and, on a remote board, running no code."""
    result = form.check_recipe(body.values, body.extras)
    if not result["ok"]:
        raise BoardError("the recipe has problems; fix the fields marked in red first:\n" + "\n".join(result["problems"]))
    if state.remote and code_keys(result["data"]):
        raise BoardError(f"this board was started with --allow-remote, so it does not run code named in a recipe "
                         f"({', '.join(code_keys(result['data']))}); run such recipes with tuneforge train on the machine")
    return result


def _finding(f, temp: str) -> dict:
    where = f.where.replace(temp, form.SOURCE)
    return {"severity": f.severity, "code": f.code, "message": f.message.replace(temp, form.SOURCE), "why": f.why,
            "fix": f.fix, "where": where, "field": form.place_problem(form.problem_key(where), set())}


def run_doctor(state: BoardState, body: RecipeBody) -> dict:
    from tuneforge.guide.doctor import device_from_gpu, doctor_recipe, summary_line

    result = _checked(state, body)
    with tempfile.TemporaryDirectory(prefix="tuneforge-board-") as tmp:
        path = Path(tmp) / form.SOURCE
        path.write_text(result["yaml"], encoding="utf-8")
        with state.heavy:
            findings = doctor_recipe(str(path), device_info=device_from_gpu(body.gpu) if body.gpu else None)
        out = [_finding(f, str(path)) for f in findings]
    summary = re.sub(r"\[/?[a-z ]*\]", "", summary_line(findings))  # rich markup off
    return {"findings": out, "summary": summary, "errors": sum(f["severity"] == "error" for f in out)}


def run_plan(state: BoardState, body: RecipeBody) -> dict:
    from tuneforge.guide.plan import GIB, format_duration, make_plan

    recipe = _checked(state, body)["recipe"]
    with state.heavy:
        plan = make_plan(recipe, gpu=body.gpu or None)
    rows = []
    for row in plan.rows:
        rows.append({"adapter": row["adapter"], "recipe": row["recipe"], "fits": row["fits"],
                     **{k: row[k] / GIB for k in ("weights", "gradients", "optimizer_states", "activations", "lm_head",
                                                  "total")},
                     "on_gpu": row["reserved_gib"], "max_batch": row["largest_batch"],
                     "time": format_duration(row["seconds"]) + ("" if row["seconds_per"] == "run"
                                                                else f" per {row['seconds_per']}"),
                     "changes": row.get("changes") or []})
    s = plan.settings
    notes = list(plan.notes) + ([s["seq_len_warning"]] if s.get("seq_len_warning") else [])
    if not body.gpu and not _has_cuda():
        notes.insert(0, f"this machine has no GPU: planned for an {plan.gpu.name}; choose the GPU you will train on above")
    return {"model": plan.model, "params_b": plan.params_total / 1e9, "gpu": plan.gpu.name,
            "gpu_gib": plan.gpu.memory_gib, "seq_len": s["seq_len"], "batch_size": s["batch_size"], "dtype": s["dtype"],
            "gradient_checkpointing": bool(s["gradient_checkpointing"]), "rows": rows,
            "notes": notes}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def recommend_questions(answers: dict) -> list[dict]:
    """The questions that apply given the answers so far (each question's own `when`), with defaults."""
    from tuneforge.guide.recommend import GOALS, QUESTIONS, _local_gpu_name, _slug, coerce_answers

    coerced = coerce_answers({k: v for k, v in answers.items() if v not in (None, "")})
    out = []
    for q in QUESTIONS:
        if not q.when(coerced):
            continue
        default = q.default
        if q.key == "gpu" and default is None:
            default = _local_gpu_name()
        if q.key == "name" and default is None:
            default = _slug(f"{coerced.get('goal', 'task')}-run")
        kind = "bool" if q.kind is bool else ("number" if q.kind in (int, float) else "text")
        choices = [{"value": c, "label": f"{c}: {GOALS[c]}" if q.key == "goal" else c} for c in q.choices or []]
        out.append({"key": q.key, "text": q.text, "kind": "choice" if choices else kind, "choices": choices,
                    "default": "yes" if default is True else ("no" if default is False else default), "help": q.help})
    return out


def recommend_recipe(answers: dict) -> dict:
    from tuneforge.guide.recommend import coerce_answers, recommend
    from tuneforge.recipe_yaml import load_yaml_bounded

    coerced = coerce_answers({k: v for k, v in answers.items() if v not in (None, "")})
    text, reasons = recommend(coerced)
    if text is None:
        return {"train": False, "reasons": reasons}
    values, extras = form.split_recipe(load_yaml_bounded(text, "recommended recipe") or {})
    return {"train": True, "reasons": reasons, "yaml": text, "values": values, "extras": extras}


def import_yaml(text: str) -> dict:
    """A pasted (or loaded) recipe's YAML as field values + extras; a YAML syntax error is a message."""
    import yaml

    from tuneforge.recipe_yaml import MAX_RECIPE_BYTES, load_yaml_bounded

    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise BoardError(f"the YAML is over {MAX_RECIPE_BYTES:,} bytes; a recipe is a few dozen keys")
    try:
        data = load_yaml_bounded(text, form.SOURCE) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{form.SOURCE}:{mark.line + 1}" if mark else form.SOURCE
        raise BoardError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise BoardError("the recipe must be a YAML mapping of keys (name:, model:, data:, ...)")
    values, extras = form.split_recipe(data)
    return {"values": values, "extras": extras}


def launch(state: BoardState, body: RecipeBody) -> dict:
    """Write the recipe under <runs>/.board/recipes/ and start `tuneforge train RECIPE --output <runs>/<name>`."""
    from tuneforge.run import lock_holder

    result = _checked(state, body)
    name = result["recipe"].name
    path = state.run_path(name, must_exist=False)
    if state.jobs.running_for(name) or (path.is_dir() and lock_holder(path)):
        raise BoardError(f"run {name} is running now; stop it first, or give this recipe another name")
    if path.exists() and any(path.iterdir()) and not body.overwrite:
        raise BoardError(f"run {name} already exists under {state.runs_dir}",
                         fix="change `name`, or tick 'replace an existing run' (train --overwrite)")
    folder = state.board_dir / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    recipe_file.write_text(result["yaml"], encoding="utf-8")
    overwrite = ["--overwrite"] if body.overwrite else []
    argv = state.tuneforge_argv("train", str(recipe_file), "--output", str(path), *overwrite)
    job = state.jobs.start("train", argv, run=name)
    return {"run": name, "job": job.describe(), "recipe_file": str(recipe_file)}


def router(state: BoardState) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/schema")
    def schema():
        from tuneforge.guide.plan import GPUS

        spec = form.form_spec()
        return {"sections": spec["sections"], "source": spec["source"], "gpus": [g.name for g in GPUS],
                "runs_dir": str(state.runs_dir), "remote": state.remote}

    @api.post("/recipe/check")
    def check(body: RecipeBody):
        return form.public(form.check_recipe(body.values, body.extras))

    @api.post("/recipe/import")
    def import_(body: YamlBody):
        return import_yaml(body.yaml)

    @api.post("/recipe/doctor")
    def doctor(body: RecipeBody):
        return run_doctor(state, body)

    @api.post("/recipe/plan")
    def plan(body: RecipeBody):
        return run_plan(state, body)

    @api.post("/recipe/launch")
    def launch_(body: RecipeBody):
        return launch(state, body)

    @api.post("/recommend/questions")
    def questions(body: AnswersBody):
        return {"questions": recommend_questions(body.answers)}

    @api.post("/recommend")
    def recommend_(body: AnswersBody):
        return recommend_recipe(body.answers)

    return api
