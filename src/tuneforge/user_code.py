"""Functions a user names in a recipe (custom metrics, custom rewards): imported from their .py file with errors
that name the recipe key and the file, never a bare traceback. What each function must look like is checked by its
caller (evaluate/metrics.py, rewards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tuneforge.errors import RecipeError


def import_user_function(path: str | Path, function_name: str, *, where: str, kind: str) -> Callable:
    """`function_name` from the Python file at `path`; `where` starts every error message, `kind` (metric, reward)
    keeps the imported modules of different kinds apart."""
    import importlib.util
    import inspect

    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError([f"{where}: file not found; give the path of a .py file (relative to the recipe or the "
                           f"working directory)"])
    if path.suffix != ".py":
        raise RecipeError([f"{where}: must be a Python file (.py)"])
    module_name = f"tuneforge_custom_{kind}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code
        raise RecipeError([f"{where}: importing the file failed: {type(exc).__name__}: {exc}"]) from None
    function = getattr(module, function_name, None)
    if function is None:
        defined = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name]
        raise RecipeError([f"{where}: the file defines no `{function_name}`; functions in it: "
                           f"{', '.join(defined) or '(none)'}"])
    if not callable(function):
        raise RecipeError([f"{where}: `{function_name}` is not a function"])
    return function
