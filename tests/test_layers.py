"""The floors hold: ``inference`` < ``training`` < ``dicom_node``, and no module imports in a circle.

Every import counts, wherever it is written (module top, inside a function, under
``TYPE_CHECKING``): a lazy import is still a dependency, and a circle through one still means two
modules cannot be understood (or changed) apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inference", "training", "dicom_node")
# a package may import itself and the packages listed for it, nothing else of ours
ALLOWED = {
    "inference": {"inference"},
    "training": {"inference", "training"},
    "dicom_node": {"inference", "training", "dicom_node"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute name of ``from .x import y`` as seen from ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports, at any nesting level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()

    def add(name: str) -> None:
        # "a.b.c" may be a module or an attribute of "a.b": take the longest known prefix
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            cand = ".".join(parts[:n])
            if cand in known:
                found.add(cand)
                return
        if parts[0] in PACKAGES:
            found.add(name)  # unknown module of ours: still reported by the floor check

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        pkg = mod.split(".")[0]
        for dep in sorted(deps):
            if dep.split(".")[0] in PACKAGES and dep.split(".")[0] not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep}")
    return bad


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected group of modules (Tarjan), e.g. [a, b, a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, set(g)) for g in groups]


def _cycle_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A concrete circle inside one strongly connected group (breadth-first back to the start)."""
    start = min(group)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(group)  # pragma: no cover - a strongly connected group always has a circle


def test_no_upward_import() -> None:
    bad = upward_imports(import_graph())
    assert not bad, "imports across floors (inference < training < dicom_node):\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from dicom_node.config import Config\n", {"dicom_node.config"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import training.run\n",
     {"training.run"}),
    ("from . import errors\n", {"inference.errors"}),
])
def test_the_walker_sees_every_kind_of_import(tmp_path: Path, source: str,
                                              expected: set[str]) -> None:
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"inference.mod", "inference.errors", "dicom_node.config", "training.run"}
    assert imports_of(path, "inference.mod", known) == expected


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    graph = {"inference.a": {"inference.b"}, "inference.b": {"inference.c"},
             "inference.c": {"inference.a", "dicom_node.x"}, "dicom_node.x": set()}
    assert find_cycles(graph) == [["inference.a", "inference.b", "inference.c", "inference.a"]]
    assert upward_imports(graph) == ["inference.c imports dicom_node.x"]
