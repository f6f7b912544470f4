"""Routes for runs (list, watch, stop, resume, report, compare), the board's jobs, chat and deploy."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from tuneforge.board import chat as chat_room
from tuneforge.board import deploy, runs
from tuneforge.board.jobs import stop_run_process
from tuneforge.board.state import BoardError, BoardState

# A run's report and a comparison are self-contained pages (inline CSS, base64 images): shown sandboxed, no scripts.
REPORT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"


class RunBody(BaseModel):
    run: str


class CompareBody(BaseModel):
    runs: list[str]


class ChatBody(BaseModel):
    run: str
    prompt: str
    system: Optional[str] = None
    max_new_tokens: int = 128


class DeployBody(BaseModel):
    run: str
    options: dict[str, Any] = Field(default_factory=dict)
    subcommand: Optional[str] = None


def stop(state: BoardState, run_id: str) -> dict:
    """SIGINT to the run's process: the board's own job, else the process holding the run's lock."""
    job = state.jobs.running_for(run_id)
    if job is not None:
        state.jobs.stop(job)
        return {"stopping": True, "pid": job.process.pid}
    return {"stopping": True, "pid": stop_run_process(state.run_path(run_id))}


def resume(state: BoardState, run_id: str) -> dict:
    """`tuneforge train --resume RUN`, after the same checks train makes (a newest complete checkpoint, no writer)."""
    from tuneforge.run import RunDir, lock_holder, resumable_checkpoint

    path = state.run_path(run_id)
    if state.jobs.running_for(run_id) or lock_holder(path):
        raise BoardError(f"run {run_id} is running; it can be resumed once it has stopped")
    checkpoint = resumable_checkpoint(RunDir(path))  # RunDirError with its fix when there is none
    job = state.jobs.start("resume", state.tuneforge_argv("train", "--resume", str(path)), run=run_id)
    return {"run": run_id, "job": job.describe(), "checkpoint": checkpoint.name}


def router(state: BoardState) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/runs")
    def list_runs():
        return {"runs": runs.list_runs(state), "runs_dir": str(state.runs_dir)}

    @api.get("/run")
    def run_detail(run: str):
        return runs.run_detail(state, run)

    @api.post("/run/stop")
    def stop_(body: RunBody):
        return stop(state, body.run)

    @api.post("/run/resume")
    def resume_(body: RunBody):
        return resume(state, body.run)

    @api.get("/run/recipe")
    def run_recipe(run: str):
        """The run's saved recipe for the form, keys at their schema default left out (the form shows those)."""
        from tuneforge.board.form import field_value, form_spec
        from tuneforge.board.recipe_api import import_yaml

        path = state.run_path(run) / "recipe.yaml"
        if not path.is_file():
            raise BoardError(f"run {run} has no recipe.yaml", status=404)
        loaded = import_yaml(path.read_text(encoding="utf-8"))
        fields = form_spec()["fields"]
        loaded["values"] = {k: v for k, v in loaded["values"].items()
                            if fields[k]["required"] or field_value(k, v) != fields[k]["default"]}
        return loaded

    @api.get("/run/report")
    def report(run: str):
        return FileResponse(runs.report_file(state, run), media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_CSP, "Cache-Control": "no-store"})

    @api.post("/run/report")
    def write_report(body: RunBody):
        runs.report_file(state, body.run, write=True)
        return {"written": True}

    @api.post("/compare")
    def compare(body: CompareBody):
        return runs.compare(state, body.runs)

    @api.get("/compare/page")
    def compare_page(name: str):
        return FileResponse(runs.comparison_page(state, name), media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_CSP, "Cache-Control": "no-store"})

    @api.get("/jobs")
    def jobs():
        return {"jobs": [job.describe() for job in reversed(state.jobs.all())]}

    @api.get("/job")
    def job(id: str):
        return state.jobs.get(id).describe(log=True)

    @api.post("/job/stop")
    def job_stop(body: dict):
        job = state.jobs.get(str(body.get("id", "")))
        state.jobs.stop(job)
        return job.describe()

    @api.post("/chat")
    def chat(body: ChatBody):
        return chat_room.chat(state, body.run, body.prompt, system=body.system, max_new_tokens=body.max_new_tokens)

    @api.get("/deploy")
    def deploy_commands():
        return {"commands": deploy.deploy_commands(state)}

    @api.post("/deploy/{name}")
    def deploy_run(name: str, body: DeployBody):
        argv = deploy.deploy_argv(state, name, body.run, body.options, body.subcommand)
        job = state.jobs.start(name, argv, run=body.run)
        return {"job": job.describe()}

    return api
