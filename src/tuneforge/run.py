"""The run directory: everything one run made, self-contained.

runs/<name>/
  recipe.yaml        resolved recipe (every default filled in)
  environment.json   library versions, device, tuneforge version
  status.json        running | failed | completed (+ error, timings): a crashed run never looks finished
  metrics.jsonl      one JSON object per logged step
  data_stats.json    counts from the data pipeline
  adapter/ | model/  the trained weights + tokenizer (+ chat template, generation config)
  checkpoints/       intermediate checkpoints (when train.save_every is set)
  eval/              baseline.json, tuned.json (metrics + samples)
  summary.json       the before/after table
  accelerate_config.yaml  (runs launched with --gpus/--cpu-processes) how the processes were started
  .tuneforge-run     the mark that tuneforge made this folder: `--overwrite` replaces only marked folders that hold
                     nothing but a run's own files (`check_replaceable`)

Under several processes (accelerate launch / torchrun) only rank 0 writes: every writing method here is a no-op
on the other ranks, and `create` on them waits for rank 0's directory instead of making one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import RunDirError


RUN_MARKER = ".tuneforge-run"
# Everything tuneforge writes at the top of a run directory (a multi-stage run's stages are marked run directories of
# their own). Anything else found there is the user's, and makes `--overwrite` refuse rather than delete it.
RUN_ENTRIES = frozenset({
    RUN_MARKER, "recipe.yaml", "environment.json", "status.json", "metrics.jsonl", "data_stats.json", "adapter",
    "model", "checkpoints", "eval", "summary.json", "report.html", "plots", "tensorboard", "accelerate_config.yaml",
    "stages.json",
})


def mark_run_directory(path: Path) -> None:
    """Create `path` (if needed) and mark it as a run directory tuneforge made."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(json.dumps({"tuneforge_run": 1, "created": time.time()}) + "\n", encoding="utf-8")


def _is_own_entry(entry: Path) -> bool:
    if entry.name in RUN_ENTRIES or entry.name.endswith(".tmp"):
        return True
    return entry.is_dir() and not entry.is_symlink() and (entry / RUN_MARKER).is_file()  # a stage of a multi-stage run


def check_output_path(path: Path, *, overwrite: bool) -> None:
    """Refuse an output path that cannot become a run directory: a file or a symbolic link, an existing run without
    --overwrite, or (with --overwrite) anything `check_replaceable` would not delete."""
    if path.is_symlink():
        raise RunDirError(f"--output {path} is a symbolic link; tuneforge does not write through or replace links",
                          fix="pass the real folder, or a new --output path")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--output {path} is a file, not a folder", fix="choose another --output path")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(f"run directory {path} already exists",
                              fix="pass --overwrite to replace it, --resume to continue it, or --output DIR for a new one")
        check_replaceable(path)


def check_replaceable(path: Path) -> list[Path]:
    """The entries `--overwrite` would delete; raises RunDirError unless `path` is a folder tuneforge marked as a run
    directory (RUN_MARKER) holding only a run's own files, and is not the current folder, one above it, home or /."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        raise RunDirError(f"--overwrite would delete {resolved}, which is the current folder, one that holds it, your "
                          f"home or the filesystem root; refusing", fix="pass --output runs/NAME (a folder of its own)")
    if path.is_symlink() or not path.is_dir():
        raise RunDirError(f"{path} is not a folder; --overwrite replaces only run directories", fix="choose another --output")
    if not (path / RUN_MARKER).is_file():
        raise RunDirError(f"{path} exists and is not a run directory tuneforge made (no {RUN_MARKER} in it); refusing "
                          "to delete it", fix="choose another --output, or move or delete that folder yourself")
    entries = sorted(path.iterdir())
    foreign = [e.name for e in entries if not _is_own_entry(e)]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(f"run directory {path} holds files tuneforge did not write ({shown}); --overwrite refuses to "
                          "delete them", fix="move those files out of the run directory, or choose another --output")
    return entries


def replace_run_directory(path: Path, console=None) -> None:
    """Delete a marked run directory (after `check_replaceable`), saying what goes."""
    entries = check_replaceable(path)
    if console is not None:
        from rich.markup import escape

        names = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries if e.name != RUN_MARKER)
        console.print(escape(f"--overwrite: removing the earlier run {path} ({names})"), highlight=False)
    shutil.rmtree(path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def is_main(self) -> bool:
        """True in a single process, and on rank 0 of a launched run: the one process that writes."""
        from tuneforge.ranks import is_main_process

        return is_main_process()

    # -- creation ------------------------------------------------------------------------------------------------
    def create(self, *, overwrite: bool, console=None) -> RunDir:
        from tuneforge.ranks import ENV_PREPARED_RUN

        if not self.is_main:
            return self._wait_for_main()
        if os.environ.get(ENV_PREPARED_RUN) == str(self.path.resolve()):
            pass  # the launcher checked --overwrite and emptied it before the ranks started
        else:
            check_output_path(self.path, overwrite=overwrite)
            if self.path.exists() and any(self.path.iterdir()):
                replace_run_directory(self.path, console)
        mark_run_directory(self.path)
        (self.path / "eval").mkdir(exist_ok=True)
        self.set_status("running", started=time.time())
        return self

    def _wait_for_main(self, timeout: float = 600.0) -> RunDir:
        """A non-zero rank: wait until rank 0 has created this run's directory (its status.json started after this
        process did), so files written next to it by rank 0 are this run's."""
        import psutil

        born = psutil.Process().create_time() - 5.0
        deadline = time.time() + timeout
        while time.time() < deadline:
            started = (self.read_json("status.json", {}) or {}).get("started") if self.path.exists() else None
            if started is not None and started >= born:
                return self
            time.sleep(0.05)
        raise RunDirError(f"rank 0 did not create the run directory {self.path} within {timeout:.0f}s")

    # -- files -------------------------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, value) -> None:
        if not self.is_main:
            return
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(target)

    def read_json(self, name: str, default=None):
        target = self.path / name
        return json.loads(target.read_text(encoding="utf-8")) if target.exists() else default

    def append_metrics(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        target = self.path / "metrics.jsonl"
        if not target.exists():
            return []
        return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]

    def set_status(self, state: str, **fields) -> None:
        if not self.is_main:
            return
        status = self.read_json("status.json", {}) or {}
        status.update(fields, state=state, updated=time.time())
        self.write_json("status.json", status)

    @property
    def status(self) -> str:
        return (self.read_json("status.json", {}) or {}).get("state", "unknown")

    @property
    def weights_dir(self) -> Path:
        """adapter/ for LoRA/QLoRA runs, model/ for full fine-tuning."""
        return self.path / "adapter" if (self.path / "adapter").exists() else self.path / "model"


@dataclass
class RunContext:
    """What one run knows besides its recipe, passed explicitly through its life (train.py) and to the method's
    trainer builder: nothing is hung on the recipe object."""

    recipe: object  # the Recipe as it runs (speed levers resolved for this device)
    spec: object  # the method's declaration (methods.Method)
    tokenizer: object
    data: object  # what the method's data kind prepared (data/)
    device: str
    console: object
    run: RunDir | None = None  # set once the run directory exists
    metric_specs: list = field(default_factory=list)  # eval.metrics, resolved
    lm_eval: object = None  # eval.lm_eval_tasks' task manager, checked before the run directory exists
    rewards: list | None = None  # rl.rewards, built and probed before the run directory exists


def open_run(path: str | Path) -> RunDir:
    """An existing, finished run directory (for eval / merge / generate)."""
    run = RunDir(path)
    if not (run.path / "recipe.yaml").exists():
        raise RunDirError(f"{run.path} is not a tuneforge run directory (no recipe.yaml)")
    if run.status != "completed":
        raise RunDirError(f"run {run.path} did not complete (status: {run.status})",
                          fix="look at status.json for the error; train again with --overwrite")
    return run


# ---------------------------------------------------------------------------------------------------------------
# Where a run goes: the folder for a recipe, a fresh or resumed run directory, the checkpoint to resume from


def run_path_for(recipe, output: str | None) -> Path:
    return Path(output) if output else Path(recipe.output_dir) / recipe.name


def start_run(path, *, checkpoint, overwrite: bool, console=None) -> RunDir:
    """The run directory: created fresh (refusing to overwrite unless asked), or, resuming from `checkpoint`, marked
    running again."""
    run = RunDir(path)
    if checkpoint is not None:
        run.set_status("running", resumed_from=checkpoint.name)
    else:
        run.create(overwrite=overwrite, console=console)
    return run


def target_run(recipe, output: str | None, *, overwrite: bool, resume: bool, console):
    """(run directory, checkpoint to resume from or None); an existing run is never replaced without --overwrite."""
    path = run_path_for(recipe, output)
    if resume:
        checkpoint = resumable_checkpoint(RunDir(path))
        console.print(f"[bold]resuming[/] {path} from {checkpoint.name}")
        return path, checkpoint
    check_output_path(path, overwrite=overwrite)  # before any work: a folder --overwrite may not delete is refused now
    return path, None


def resumable_checkpoint(run: RunDir) -> Path:
    """The newest complete checkpoint of an unfinished run. Checkpoints that lack their trainer state (a save cut
    short) are skipped, so an interrupted save never stops a resume."""
    if not (run.path / "recipe.yaml").exists():
        raise RunDirError(f"{run.path} is not a tuneforge run directory (no recipe.yaml)", fix="pass the run directory")
    if run.status == "completed":
        raise RunDirError(f"run {run.path} already completed; nothing to resume",
                          fix="train a new run (--output) or raise train.max_steps in a new recipe")
    candidates = sorted((p for p in (run.path / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for candidate in candidates:
        if (candidate / "trainer_state.json").exists():
            return candidate
    raise RunDirError(f"run {run.path} has no complete checkpoint to resume from",
                      fix="set train.save_every so checkpoints are written, then train again")


def environment() -> dict:
    """Versions and device, saved with every run."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in ("tuneforge", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {"python": platform.python_version(), "platform": platform.platform(), "device": device, "versions": versions}
