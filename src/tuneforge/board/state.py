"""What the board knows while it runs (the runs folder, the access token, the `tuneforge` command's app, the jobs it
started), and the one rule for every path a request names: a run is a folder under the runs folder, an output goes
under the runs folder, an input is an existing file. Nothing a request sends is ever run by a shell."""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import TuneforgeError

BOARD_DIR = ".board"  # the board's own files under the runs folder: recipes it launched, logs, comparison pages
RUN_FILES = ("recipe.yaml", "status.json", ".tuneforge-run")
MAX_VALUE_CHARS = 4000  # one form value (a path, a name, a YAML list); a recipe is a few dozen of them


class BoardError(TuneforgeError):
    """A request the board refuses (a path outside the runs folder, a command that is not installed, ...): shown on
    the page as a message, never as a traceback."""

    def __init__(self, message: str, *, fix: str | None = None, status: int = 400):
        self.status = status
        super().__init__(message, fix=fix)


@dataclass
class BoardState:
    runs_dir: Path
    token: str | None = None
    remote: bool = False  # started with --allow-remote: recipes that run code from files are refused
    cli_app: object = None  # the `tuneforge` typer app, to see which commands are registered (export, serve)
    cwd: Path = field(default_factory=Path.cwd)
    heavy: threading.Lock = field(default_factory=threading.Lock)  # doctor, plan, chat: one at a time on the CPU
    jobs: object = None  # jobs.Jobs, set by app.create_app

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir).resolve()
        self.cwd = Path(self.cwd).resolve()

    @property
    def board_dir(self) -> Path:
        path = self.runs_dir / BOARD_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tuneforge_argv(self, *args: str) -> list[str]:
        """The argument list that runs `tuneforge ARGS` with this Python (never a shell string)."""
        return [sys.executable, "-m", "tuneforge", *args]

    # -- paths -----------------------------------------------------------------------------------------------------
    def run_path(self, run_id: str, *, must_exist: bool = True) -> Path:
        """The run folder `run_id` names ("name" or "name/stage"), which must lie under the runs folder."""
        path = self.under_runs(run_id, what="run")
        if path == self.runs_dir or path.parts[len(self.runs_dir.parts)] == BOARD_DIR:
            raise BoardError(f"run {run_id!r}: not a run folder", fix="pick a run from the Runs list")
        if must_exist and not (path.is_dir() and any((path / name).exists() for name in RUN_FILES)):
            raise BoardError(f"run {run_id!r}: no such run under {self.runs_dir}", fix="pick a run from the Runs list",
                             status=404)
        return path

    def under_runs(self, value: str, *, what: str) -> Path:
        """`value` (relative to the runs folder, or absolute inside it) resolved; refused when it leaves the folder."""
        text = plain_value(value, what)
        candidate = Path(text).expanduser()
        path = (candidate if candidate.is_absolute() else self.runs_dir / candidate).resolve()
        if path != self.runs_dir and self.runs_dir not in path.parents:
            raise BoardError(f"{what} {text!r} lies outside the runs folder {self.runs_dir}",
                             fix="give a name or a path inside the runs folder")
        return path

    def output_or_input(self, value: str, *, what: str) -> Path:
        """A path option of a deploy command: an existing file anywhere (an input), else a path under the runs folder."""
        text = plain_value(value, what)
        candidate = Path(text).expanduser()
        if candidate.is_absolute() and candidate.is_file():
            return candidate.resolve()
        if not candidate.is_absolute() and (self.cwd / candidate).is_file():
            return (self.cwd / candidate).resolve()
        return self.under_runs(text, what=what)

    def run_id(self, path: Path) -> str:
        return path.resolve().relative_to(self.runs_dir).as_posix()


def plain_value(value, what: str) -> str:
    """A form value as text: a string of at most MAX_VALUE_CHARS without control characters."""
    if not isinstance(value, str) or not value.strip():
        raise BoardError(f"{what}: a value is needed")
    if len(value) > MAX_VALUE_CHARS:
        raise BoardError(f"{what}: {len(value):,} characters; at most {MAX_VALUE_CHARS:,}")
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise BoardError(f"{what}: holds control characters (a newline?); give a single-line value")
    return value.strip()
