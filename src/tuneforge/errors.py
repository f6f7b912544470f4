"""User-facing errors. Each names where the problem is (file:line, or a recipe key) and how to fix it.

The CLI prints these without a traceback and exits with code 2; anything else is a bug in tuneforge.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base class for errors caused by user input (recipes, data, model names, run directories)."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class RecipeError(TuneforgeError):
    """A recipe key is missing, misspelt or has a bad value. `problems` holds every problem found."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = problems
        head = f"recipe {source} has {len(problems)} problem(s):" if source else f"{len(problems)} recipe problem(s):"
        super().__init__(head + "".join(f"\n  - {p}" for p in problems))


class DataError(TuneforgeError):
    """A data file is unreadable, malformed, or an example breaks the format's rules."""


class ModelError(TuneforgeError):
    """A model cannot be found or loaded, or lacks something the recipe needs (e.g. a chat template)."""


class RunDirError(TuneforgeError):
    """A run directory exists and would be overwritten, or is not a tuneforge run directory."""


class DiskFullError(TuneforgeError):
    """The disk filled up while a checkpoint or the run's files were written (checkpoints.py)."""

    exit_code = 4


class OutOfMemory(TuneforgeError):
    """The device ran out of memory; the message carries the step and the memory plan's advice (guards.py)."""

    exit_code = 5

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None, step: int | None = None,
                 phase: str = "training"):
        self.step = step
        self.phase = phase
        super().__init__(message, where=where, fix=fix)
