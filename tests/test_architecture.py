"""The house keeps its shape (docs/ARCHITECTURE.md): imports inside src/tuneforge -- module level and inside functions
alike -- form no loop of more than 3 modules, and no source file grows past about 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "tuneforge"
MAX_LOOP = 3
MAX_LINES = 700


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the tuneforge modules it imports (anywhere in the file). `from tuneforge.x import y` counts as an
    import of tuneforge.x.y when that is a module, else of tuneforge.x."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("tuneforge"):
                    graph[name].add(target)
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), largest first."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    import sys

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=len, reverse=True)


def test_no_import_loop_of_more_than_three_modules():
    loops = import_loops(import_graph())
    too_big = [loop for loop in loops if len(loop) > MAX_LOOP]
    assert not too_big, f"import loops over {MAX_LOOP} modules: {too_big}"


def test_no_source_file_over_700_lines():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_readme_method_table_is_the_registry():
    from tuneforge.methods import methods_markdown

    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- methods:begin", 1)[1].split("-->", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert block.strip() == methods_markdown(), "README's method table differs from the registry: paste methods_markdown()"


def test_every_method_declares_itself_consistently():
    """Families and data kinds from the known sets, each default rate inside its documented range, every refused
    key a real recipe key, and the schema's method list equal to the registry's."""
    from tuneforge.methods import DATA_KINDS, FAMILIES, method_names, method_spec
    from tuneforge.recipe import Recipe

    names = method_names()
    assert len(names) == len(set(names)) and "sft" in names
    for name in names:
        m = method_spec(name)
        assert m.family in FAMILIES and m.data in DATA_KINDS, name
        for kind in ("lora", "qlora", "full", "none"):
            low, high = m.lr_range_for(kind)
            assert low <= m.default_lr(kind) <= high, (name, kind)
        for refusal in m.refuses:
            section, key = refusal.key.split(".")
            assert key in Recipe.model_fields[section].annotation.model_fields, (name, refusal.key)
        for section in m.reads:
            assert section in Recipe.model_fields, (name, section)
    assert all(name in Recipe.model_fields["method"].description for name in names)


if __name__ == "__main__":  # python tests/test_architecture.py: the numbers the closing note gives
    loops = import_loops(import_graph())
    print("largest import loop:", len(loops[0]) if loops else 0, loops[0] if loops else "")
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(SRC))) for p in PACKAGE.rglob("*.py")), reverse=True)
    print("longest files:", sizes[:5])
