"""Reading a recipe's YAML safely: bounded (a size cap is applied by `recipe.load_recipe`; here, a document whose
aliases expand beyond MAX_YAML_NODES values or MAX_YAML_DEPTH levels is refused before anything expands it), and
each key's line for error messages (`_key_lines`), walking every node once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.errors import RecipeError

# Bounds on a recipe file: YAML aliases share one node between many places, so a small file can stand for an
# enormous document ("billion laughs"); a recipe is refused before anything expands it.
MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_NODES = 10_000  # nodes of the document with every alias expanded
MAX_YAML_DEPTH = 50


def _yaml_bounds_problem(root) -> str | None:
    """Why a composed YAML document is too large to expand (None when it is within the bounds). Each node is visited
    once: a node's expanded size is memoised by id, so an alias bomb costs its own size, not its expansion."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)
    active: set[int] = set()

    def measure(node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Unbounded("an alias refers to a node that contains it (a recursive document)")
        if depth > MAX_YAML_DEPTH:
            raise _Unbounded(f"it nests deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        active.add(key)
        total, deepest = 1, 0
        for child in children:
            size, child_depth = measure(child, depth + 1)
            total += size
            deepest = max(deepest, child_depth + 1)
            if total > MAX_YAML_NODES:
                raise _Unbounded(f"with its aliases expanded it has more than {MAX_YAML_NODES:,} values")
            if deepest > MAX_YAML_DEPTH:
                raise _Unbounded(f"with its aliases expanded it nests deeper than {MAX_YAML_DEPTH} levels")
        active.discard(key)
        sizes[key] = (total, deepest)
        return sizes[key]

    try:
        measure(root, 0)
    except _Unbounded as exc:
        return str(exc)
    return None


class _Unbounded(Exception):
    pass


def load_yaml_bounded(text: str, where: str):
    """`yaml.safe_load(text)` for a recipe (or a `--set` value), refusing a document beyond MAX_YAML_NODES values or
    MAX_YAML_DEPTH levels once its aliases are expanded, before anything expands it. Raises yaml.YAMLError for
    invalid YAML, RecipeError (naming `where`) for a document that is too large."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise RecipeError([f"{where}: the YAML nests too deeply to read (more than {MAX_YAML_DEPTH} levels are "
                               f"refused)"]) from None
        if root is None:
            return None
        problem = _yaml_bounds_problem(root)
        if problem:
            raise RecipeError([f"{where}: refused, {problem}; a recipe is a few dozen keys (YAML anchors and "
                               f"aliases (&name / *name) that repeat large blocks are the usual cause)"])
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _key_lines(text: str, duplicates: list[str] | None = None, source: str | None = None) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages. A key given twice in one
    mapping (YAML keeps only the last, silently) is described in `duplicates` when that list is passed. Each node
    is walked once (an aliased block gets the lines of its first place), and at most MAX_YAML_NODES of them."""
    import yaml

    lines: dict[tuple, int] = {}
    seen: set[int] = set()

    def walk(node, path):
        if id(node) in seen or len(seen) > MAX_YAML_NODES or len(path) > MAX_YAML_DEPTH:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, value_node in node.value:
                sub = path + (key_node.value,)
                line = key_node.start_mark.line + 1
                if sub in first_line and duplicates is not None:
                    key = ".".join(str(p) for p in sub)
                    duplicates.append(f"`{key}` ({source or 'recipe'}:{line}): given twice (also on line "
                                      f"{first_line[sub]}); YAML would silently keep only the last one, so merge them")
                first_line.setdefault(sub, line)
                lines[sub] = line
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        root = yaml.compose(text)
    except (yaml.YAMLError, RecursionError):
        return lines
    if root is not None:
        walk(root, ())
    return lines


def read_recipe_file(path: Path) -> tuple[str, Any]:
    """(text, data) of a recipe file: at most MAX_RECIPE_BYTES, UTF-8, valid YAML within the bounds above; each
    problem is a RecipeError naming the file (and line)."""
    import yaml

    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"], source=str(path))
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError([f"{path}: the file is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes (is it "
                           f"a data file? data goes in data.train)"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError([f"{path}:{line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"],
                          source=str(path)) from None
    try:
        data = load_yaml_bounded(text, str(path)) or {}
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"], source=str(path)) from None
    return text, data
