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
  .tuneforge-lock    the lock of the process writing the run (its pid inside), held with flock(2) for the run's whole
                     life: a second `train --resume`, an `--overwrite` of the folder or a `merge` into it is refused
                     while it is held. The kernel drops it with the process, so a killed run can be resumed at once.

Under several processes (accelerate launch / torchrun) only rank 0 writes: every writing method here is a no-op
on the other ranks, and `create` on them waits for rank 0's directory instead of making one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import DiskFullError, RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover -- Windows: no lock
    fcntl = None


RUN_MARKER = ".tuneforge-run"
LOCK_FILE = ".tuneforge-lock"
# Everything tuneforge writes at the top of a run directory (a multi-stage run's stages are marked run directories of
# their own). Anything else found there is the user's, and makes `--overwrite` refuse rather than delete it.
RUN_ENTRIES = frozenset({
    RUN_MARKER, "recipe.yaml", "environment.json", "status.json", "metrics.jsonl", "data_stats.json", "adapter",
    "model", "checkpoints", "eval", "summary.json", "report.html", "plots", "tensorboard", "accelerate_config.yaml",
    "stages.json", LOCK_FILE,
})


def mark_run_directory(path: Path) -> None:
    """Create `path` (if needed) and mark it as a run directory tuneforge made."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(json.dumps({"tuneforge_run": 1, "created": time.time()}) + "\n", encoding="utf-8")


def _is_own_entry(entry: Path) -> bool:
    if entry.name in RUN_ENTRIES or entry.name.endswith(".tmp"):
        return True
    return entry.is_dir() and not entry.is_symlink() and (entry / RUN_MARKER).is_file()  # a stage of a multi-stage run


def _has_entries(path: Path) -> bool:
    """Anything in `path` besides a lock file (which a refused or finished writer may leave behind)."""
    return path.is_dir() and any(e.name != LOCK_FILE for e in path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The run lock: one writing process per run directory

_HELD: dict[str, int] = {}  # resolved run directory -> fd of the lock this process holds (re-entrant in-process)


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def holds_run_lock(path: Path) -> bool:
    """True when this process holds the lock of the run directory `path`."""
    return _key(path) in _HELD


def lock_holder(path: Path) -> str | None:
    """Who holds `path`'s lock when another process does ("process 1234 (tuneforge train, on host, since ...)"); None
    when it is free or held by this process."""
    lock = Path(path) / LOCK_FILE
    if fcntl is None or holds_run_lock(path) or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # no flock on this filesystem: nothing to go by
            return _describe_holder(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid")
    if pid is None:
        return "another process (pid not recorded yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"process {pid} ({info.get('command', 'tuneforge')}, on {info.get('host', '?')}, since {since})"


def _in_use_error(path: Path, holder: str, doing: str) -> RunDirError:
    return RunDirError(f"run directory {path} is in use: {holder} is writing it; {doing} is refused while it runs",
                       fix=f"wait for that run to finish (or stop it: Ctrl-C, or kill the process), then try again; "
                       f"or choose another --output")


def acquire_run_lock(path: Path, *, doing: str = "tuneforge train") -> None:
    """Take the lock of the run directory `path` (which must exist) for this process, writing its pid into the lock
    file; RunDirError naming the holder when another process has it. Re-entrant within one process. The lock lasts
    until `release_run_lock` or the end of the process (the kernel drops it, even on SIGKILL). Filesystems without
    flock(2) run unlocked."""
    if fcntl is None or holds_run_lock(path):
        return
    lock = Path(path) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use_error(Path(path), _describe_holder(lock), doing) from None
        return  # ENOLCK / EOPNOTSUPP: this filesystem has no flock
    import socket
    import sys

    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": " ".join(["tuneforge", *sys.argv[1:3]]) if sys.argv and "tuneforge" in sys.argv[0] else doing}
    try:
        os.ftruncate(fd, 0)
        _write_bytes(fd, (json.dumps(info) + "\n").encode())
    except OSError:  # a full disk: the lock holds all the same, without the pid
        pass
    _HELD[_key(path)] = fd


def release_run_lock(path: Path) -> None:
    """Drop this process's lock on `path` (no-op when it holds none). The lock file stays (it names no holder)."""
    fd = _HELD.pop(_key(path), None)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def release_run(run: RunDir | None) -> None:
    """The end of a run's life in this process (train.py calls it in `train()`'s `finally`): its lock goes, so another
    process may resume, overwrite or merge into it. A process that ends releases it anyway."""
    if run is not None:
        release_run_lock(run.path)


def refuse_if_in_use(path: Path, doing: str) -> None:
    """RunDirError when `path`, or a run directory above it, or a stage run directory in it, is locked by another
    process (a run training there). Only the writing process asks: under a launcher the other ranks never write, and
    rank 0's own lock is not theirs to refuse."""
    from tuneforge.ranks import is_main_process

    if not is_main_process():
        return
    path = Path(path)
    candidates = [path, *path.resolve().parents]
    if path.is_dir() and not path.is_symlink():
        candidates += [e for e in path.iterdir() if e.is_dir() and not e.is_symlink() and (e / RUN_MARKER).is_file()]
    for candidate in candidates:
        holder = lock_holder(candidate)
        if holder is not None:
            raise _in_use_error(candidate, holder, doing)


def check_output_path(path: Path, *, overwrite: bool) -> None:
    """Refuse an output path that cannot become a run directory: a file or a symbolic link, an existing run without
    --overwrite, or (with --overwrite) anything `check_replaceable` would not delete."""
    if path.is_symlink():
        raise RunDirError(f"--output {path} is a symbolic link; tuneforge does not write through or replace links",
                          fix="pass the real folder, or a new --output path")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--output {path} is a file, not a folder", fix="choose another --output path")
    if _has_entries(path):
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
    refuse_if_in_use(path, "--overwrite")  # a run still training there (or in one of its stages) is not deleted
    entries = sorted(path.iterdir())
    foreign = [e.name for e in entries if not _is_own_entry(e)]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(f"run directory {path} holds files tuneforge did not write ({shown}); --overwrite refuses to "
                          "delete them", fix="move those files out of the run directory, or choose another --output")
    return entries


def replace_run_directory(path: Path, console=None) -> None:
    """Empty a marked run directory (after `check_replaceable`), saying what goes. It is done holding the run's lock
    (taken here for the deletion when the caller does not hold it), and the lock file itself stays, so no other
    process can start writing the folder while it is emptied."""
    entries = check_replaceable(path)
    if console is not None:
        from rich.markup import escape

        names = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries if e.name not in (RUN_MARKER, LOCK_FILE))
        console.print(escape(f"--overwrite: removing the earlier run {path} ({names})"), highlight=False)
    temporary = not holds_run_lock(path)
    acquire_run_lock(path, doing="--overwrite")
    try:
        for entry in sorted(path.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    finally:
        if temporary:
            release_run_lock(path)


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
        # The launcher checked --overwrite and emptied the folder before the ranks started.
        prepared = os.environ.get(ENV_PREPARED_RUN) == str(self.path.resolve())
        if not prepared:
            check_output_path(self.path, overwrite=overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            acquire_run_lock(self.path)  # held for the run's life; refused while another process writes here
        except OSError as exc:
            raise _disk_full_or(exc, self.path, "the run directory") from None
        try:
            if not prepared:
                check_output_path(self.path, overwrite=overwrite)  # again, under the lock: another run may have started
                if _has_entries(self.path):
                    replace_run_directory(self.path, console)
            try:
                mark_run_directory(self.path)
                (self.path / "eval").mkdir(exist_ok=True)
            except OSError as exc:
                raise _disk_full_or(exc, self.path, RUN_MARKER) from None
            self.set_status("running", started=time.time())
        except BaseException:
            release_run_lock(self.path)
            raise
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
        self.write_text(name, json.dumps(value, indent=2, ensure_ascii=False, default=str))

    def write_text(self, name: str, text: str) -> None:
        """Write a file of the run atomically (a temporary sibling, then a rename): whole or as it was. A full disk
        removes the temporary file and raises DiskFullError."""
        if not self.is_main:
            return
        write_atomic(self.path / name, text)

    def read_json(self, name: str, default=None):
        target = self.path / name
        return json.loads(target.read_text(encoding="utf-8")) if target.exists() else default

    def append_metrics(self, row: dict) -> None:
        """One row more in metrics.jsonl; a write cut short (full disk) is undone, so the file never ends in half a
        row."""
        if not self.is_main:
            return
        target = self.path / "metrics.jsonl"
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_bytes(fd, (json.dumps(row) + "\n").encode("utf-8"))
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise _disk_full_or(exc, target, "metrics.jsonl") from None
        finally:
            os.close(fd)

    def metrics(self) -> list[dict]:
        target = self.path / "metrics.jsonl"
        if not target.exists():
            return []
        lines = [line for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i != len(lines) - 1:
                    raise
                # the last row cut short by a kill mid-write: it is logged again on resume
        return rows

    def keep_metrics_through(self, step: int) -> None:
        """On resume from checkpoint-`step`: drop the rows logged after that checkpoint was saved (they are logged
        again): every row of a later step, and at that step the end-of-training rows (the Trainer's train summary,
        the final held-out loss) that follow the save."""
        kept = [row for row in self.metrics() if row.get("step", 0) < step or (
            row.get("step", 0) == step and not row.get("final") and "train_loss" not in row)]  # train_loss: the summary
        self.write_text("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in kept))

    def set_status(self, state: str, **fields) -> None:
        """Update status.json. A final state (failed, interrupted) is written even on a full disk when at all
        possible (in place, when no room is left for a second copy), and never raises: it must not hide the error
        that ended the run."""
        if not self.is_main:
            return
        status = self.read_json("status.json", {}) or {}
        status.update(fields, state=state, updated=time.time())
        if state not in ("failed", "interrupted"):
            self.write_json("status.json", status)
            return
        text = json.dumps(status, indent=2, ensure_ascii=False, default=str)
        try:
            write_atomic(self.path / "status.json", text)
        except (OSError, DiskFullError):
            try:
                with open(self.path / "status.json", "r+", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.truncate()
            except OSError:
                import sys

                print(f"warning: could not record status {state!r} in {self.path / 'status.json'} (disk full?)",
                      file=sys.stderr)

    @property
    def status(self) -> str:
        return (self.read_json("status.json", {}) or {}).get("state", "unknown")

    @property
    def weights_dir(self) -> Path:
        """adapter/ for LoRA/QLoRA runs, model/ for full fine-tuning."""
        return self.path / "adapter" if (self.path / "adapter").exists() else self.path / "model"


def _write_bytes(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (the one place run files are written, so tests can inject a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(target: Path, text: str) -> None:
    """`target` replaced by `text` whole, or left as it was: written to `target.tmp`, flushed, renamed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_bytes(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _disk_full_or(exc, target, target.name) from None


def _disk_full_or(exc: OSError, where: Path, what: str) -> BaseException:
    """DiskFullError when `exc` is a full disk, else `exc` itself (to re-raise)."""
    from tuneforge.checkpoints import _gib, free_bytes, is_disk_full

    if not is_disk_full(exc, Path(where)):
        return exc
    return DiskFullError(f"disk full while writing {what} ({type(exc).__name__}: {exc}); "
                         f"{_gib(free_bytes(Path(where)))} free there", where=str(where),
                         fix="free space on that disk (or move the run elsewhere), then: tuneforge train --resume "
                         "RUN_DIR (continues from the newest checkpoint)")


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
        if run.is_main:
            acquire_run_lock(run.path, doing="train --resume")  # held for the run's life (release_run)
            try:  # under the lock: the run may have moved on (or finished) since `target_run` looked
                current = resumable_checkpoint(run)
                if current.name != Path(checkpoint).name:
                    raise RunDirError(f"run {run.path} changed while this resume was getting ready (its newest "
                                      f"checkpoint is now {current.name}, not {Path(checkpoint).name})",
                                      fix=f"run tuneforge train --resume {run.path} again")
                run.set_status("running", resumed_from=checkpoint.name)
            except BaseException:
                release_run_lock(run.path)
                raise
    else:
        run.create(overwrite=overwrite, console=console)
    return run


def target_run(recipe, output: str | None, *, overwrite: bool, resume: bool, console):
    """(run directory, checkpoint to resume from or None); an existing run is never replaced without --overwrite."""
    path = run_path_for(recipe, output)
    if resume:
        refuse_if_in_use(path, "train --resume")  # before any work; `start_run` takes the lock
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
