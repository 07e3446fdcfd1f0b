"""The module graph of mamikit: no import loops, and data moves one way (docs/design.md "Data flow").

Every `import` of a mamikit module counts, function-local ones included: a
lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mamikit"
PACKAGE_MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (`__init__` for the package itself)."""
    modules = {p.stem for p in package.glob("*.py")}
    name = package.name
    graph = {}
    for path in sorted(package.glob("*.py")):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] == name]
                edges.update(parts[1] if len(parts) > 1 else "__init__" for parts in targets)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    parts = [name] + (node.module.split(".") if node.module else [])
                elif node.level == 0 and node.module and node.module.split(".")[0] == name:
                    parts = node.module.split(".")
                else:
                    continue
                if len(parts) > 1:
                    edges.add(parts[1])
                else:  # `from . import x`: a module, or a name defined in __init__
                    edges.update(a.name if a.name in modules else "__init__" for a in node.names)
        edges.discard(path.stem)
        graph[path.stem] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_checker_sees_a_loop_through_a_function_local_import(tmp_path):
    pkg = tmp_path / "mamikit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    import mamikit.c\n")
    (pkg / "c.py").write_text("from mamikit import __version__\n")
    graph = module_graph(pkg)
    assert graph == {"__init__": set(), "a": {"b"}, "b": {"a", "c"}, "c": {"__init__"}}
    assert find_cycles(graph) == [["a", "b"]]


def test_mamikit_has_no_import_loop():
    graph = module_graph(PACKAGE)
    assert {"model", "train", "runs", "rounds", "experiments"} <= set(graph)
    assert find_cycles(graph) == []


# module -> modules it must not reach, directly or through others
FORBIDDEN = [
    ("experiments", {"train", "runs", "rounds", "model"}),  # the registry names things and runs nothing
    # the model knows neither the loop, its losses, nor how features are extracted, stored and batched
    ("model", {"train", "runs", "batching", "extraction", "store", "losses"}),
    ("runs", {"train", "rounds"}),  # the run directory is read without the loop
    ("viz", {"train", "rounds"}),  # figures read runs through runs.py
    ("analysis", {"train", "rounds"}),
    ("predict", {"train", "rounds"}),
    ("train", {"rounds", "curves", "analysis", "viz", "widgets"}),  # the loop logs (runlog), the notebooks plot
    ("runlog", {"train", "curves", "analysis"}),  # the log's writer sits below its readers
    # configuration sits below the loop
    ("settings", {"train", "runs", "evaluation", "model", "checkpoints", "rounds"}),
]


def test_every_forbidden_edge_names_a_module():
    """A rule about a module that does not exist (renamed, removed) could never fail."""
    modules = set(module_graph(PACKAGE))
    named = {module for module, _ in FORBIDDEN} | {f for _, forbidden in FORBIDDEN for f in forbidden}
    assert sorted(named - modules) == []


@pytest.mark.parametrize("module,forbidden", FORBIDDEN)
def test_data_moves_one_way(module, forbidden):
    assert module in PACKAGE_MODULES and forbidden <= PACKAGE_MODULES  # a renamed module must not empty the rule
    assert not reachable(module_graph(PACKAGE), module) & forbidden
