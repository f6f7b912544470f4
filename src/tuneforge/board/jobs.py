"""The processes the board starts: `tuneforge train`, `train --resume`, `merge`, `export`, `serve`, each a separate
process from an argument list (never a shell), in its own session so that the board, its page and its terminal's
Ctrl-C do not take it down, with its output in a log file under <runs>/.board/logs/. Stop = SIGINT, Ctrl-C's
semantics: a training run finishes its step, saves a checkpoint and records `interrupted`."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.board.state import BoardError, BoardState

LOG_TAIL_BYTES = 12_000
TRAINING_KINDS = ("train", "resume")
SECRET_OPTION = re.compile(r"^(--[\w-]*(?:key|token|secret|password)[\w-]*)=.*$", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Job:
    id: str
    kind: str  # train | resume | merge | export | serve
    argv: list[str]
    log: Path
    process: subprocess.Popen
    run: str | None = None  # the run id it writes or reads
    started: float = field(default_factory=time.time)
    stop_requested: float | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def state(self) -> str:
        code = self.returncode
        if code is None:
            return "stopping" if self.stop_requested else "running"
        return "finished" if code == 0 else ("stopped" if self.stop_requested else "failed")

    def describe(self, *, log: bool = False) -> dict:
        out = {"id": self.id, "kind": self.kind, "run": self.run, "state": self.state, "returncode": self.returncode,
               "pid": self.process.pid, "started": self.started, "command": display_command(self.argv)}
        if log:
            out["log"] = log_tail(self.log)
        return out


def display_command(argv: list[str]) -> str:
    """The command as a person would type it (`tuneforge train ...`), for the page; quoted for reading only."""
    import shlex

    args = argv[3:] if argv[1:3] == ["-m", "tuneforge"] else argv
    shown = [SECRET_OPTION.sub(r"\1=***", a) for a in args]  # an --api-key=... typed in a form stays off the page
    return "tuneforge " + " ".join(shlex.quote(a) for a in shown)


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a log as plain text: colour codes removed, progress bars redrawn with \\r kept at their last state."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            data = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [_last_state(line) for line in data.split("\n")]
    return "\n".join(lines[1:] if size > limit else lines)  # the first line may be cut


def _last_state(line: str) -> str:
    parts = [part for part in _ANSI.sub("", line).split("\r") if part.strip()]
    return parts[-1] if parts else ""


class Jobs:
    """The board's jobs, newest last. Finished processes are reaped whenever the table is read."""

    def __init__(self, state: BoardState):
        self.state = state
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, argv: list[str], *, run: str | None = None) -> Job:
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TypeError("a job's command is a list of strings")  # a bug, not a user error: never a shell string
        logs = self.state.board_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with self._lock:
            job_id = f"{kind}-{next(self._ids)}-{int(time.time())}"
        log = logs / f"{job_id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "TERM": "dumb"}
        with open(log, "wb") as handle:
            handle.write((display_command(argv) + "\n").encode())
            handle.flush()
            try:
                process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=self.state.cwd, env=env, start_new_session=True, shell=False)
            except OSError as exc:
                raise BoardError(f"could not start {display_command(argv)}: {exc}") from None
        job = Job(job_id, kind, argv, log, process, run=run)
        with self._lock:
            self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise BoardError(f"no job {job_id!r} (jobs are kept while the board runs)", status=404)
        return job

    def all(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.process.poll()  # reap
        return jobs

    def latest_for(self, run: str) -> Job | None:
        """The newest training job (train or resume) of `run`; deploy jobs that read the run are not its writer."""
        jobs = [j for j in self.all() if j.run == run and j.kind in TRAINING_KINDS]
        return jobs[-1] if jobs else None

    def running_for(self, run: str) -> Job | None:
        job = self.latest_for(run)
        return job if job is not None and job.returncode is None else None

    def stop(self, job: Job) -> None:
        """SIGINT, as Ctrl-C: a training run saves a checkpoint at the end of its step and stops."""
        if job.returncode is not None:
            raise BoardError(f"job {job.id} has already ended ({job.state})")
        job.stop_requested = time.time()
        try:
            os.kill(job.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def stop_run_process(run_path: Path) -> int:
    """SIGINT to the process that holds `run_path`'s run lock (a run started outside this board): its pid is read
    from the lock file only while the lock is held, so it is that run's live process. Returns the pid."""
    from tuneforge.run import LOCK_FILE, lock_holder

    if lock_holder(run_path) is None:
        raise BoardError(f"run {run_path.name} has no process writing it (it is not running)")
    try:
        pid = int(json.loads((run_path / LOCK_FILE).read_text(encoding="utf-8")).get("pid"))
    except (OSError, ValueError, TypeError):
        raise BoardError(f"run {run_path.name} is running but its process id is not recorded; stop it with Ctrl-C "
                         "where it was started") from None
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        raise BoardError(f"run {run_path.name}: its process has just ended") from None
    except PermissionError:
        raise BoardError(f"run {run_path.name} belongs to another user's process ({pid}); the board may not stop it") \
            from None
    return pid
