"""The shape of the house: no import cycles in src/medlens, no module over 600 lines.

The import graph is built from the source with ``ast``, so it sees every ``import``, including the ones
inside functions (a function-level import does not break a cycle, it only hides it). Imports under
``if TYPE_CHECKING:`` are left out: they never run. Run this file as a script to print the graph's cycles
and the longest modules::

    .venv/bin/python tests/test_architecture.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "medlens"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_package: bool, known: set[str] | dict[str, Path]) -> set[str]:
    """Dotted names imported anywhere in ``tree`` (module level and inside functions and classes).

    ``from a import b`` counts as importing the module ``a.b`` when ``b`` is one of the ``known`` modules
    (``a`` is its parent package, initialised first in any case), else as importing ``a``, whose names it reads.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # "from a import b": the module a.b when there is one, else a
                found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", mods)
        graph[name] = {target for target in imported if target in mods and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, as import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges)


def line_counts() -> dict[str, int]:
    return {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in src/medlens (function-level imports count):\n" + "\n".join(
        _describe(c, graph) for c in found)


def test_graph_sees_function_level_imports_and_finds_cycles():
    tree = ast.parse("def f():\n    from medlens.errors import DataError\n")
    assert "medlens.errors" in _imports(tree, "medlens.x", False, {"medlens.errors"})
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import medlens.errors\n")
    assert "medlens.errors" not in _imports(tree, "medlens.x", False, {"medlens.errors"})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_layers_point_one_way():
    """Training does not reach evaluation, and the forward path is below everything that predicts."""
    graph = import_graph()
    assert "medlens.evaluate" not in _reachable(graph, "medlens.train")
    below = _reachable(graph, "medlens.forward")
    assert not below & {"medlens.inference", "medlens.uncertainty", "medlens.calibration", "medlens.selective",
                        "medlens.trust", "medlens.train", "medlens.evaluate"}


def test_no_module_over_600_lines():
    too_long = {name: n for name, n in line_counts().items()
                if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them along a real seam): {too_long}"


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} import edges")
    found = cycles(graph)
    print(f"{len(found)} cycle(s)")
    for c in found:
        print(_describe(c, graph))
    counts = sorted(line_counts().items(), key=lambda kv: -kv[1])
    print(f"longest modules (limit {MAX_LINES}):")
    for name, n in counts[:8]:
        print(f"  {n:5d}  {name}")
