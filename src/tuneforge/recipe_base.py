"""What every recipe section is built from: the strict pydantic base, the keyed cross-field error and the
"unknown X, did you mean" check. A room that owns a recipe section (federated/section.py, ...) defines it on these,
and recipe.py puts it into the Recipe; nothing here imports the rest of tuneforge."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict


def one_of(value: str, names: list[str], what: str, known: str) -> str:
    """`value` if it is one of `names`, else a ValueError with the closest name and the list."""
    if value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        raise ValueError(f"unknown {what} {value!r}; " + (f"did you mean {close[0]!r}? " if close else "")
                         + f"{known}: {', '.join(names)}")
    return value


class KeyedValueError(ValueError):
    """A cross-field problem raised by a model validator, carrying the recipe key it is about (pydantic reports a
    model validator's errors at the top level; this puts them back on the key, with its YAML line)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


class Section(BaseModel):
    # allow_inf_nan=False: every float key of every section must be a finite number (`.inf` or `.nan` epochs, warmup or
    # learning rates would otherwise pass `gt=0` / `ge=0` and fail deep inside training).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
