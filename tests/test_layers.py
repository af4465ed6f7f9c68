"""tpc's module layers, read from the source: every import (module level, inside functions, under
TYPE_CHECKING) is an edge of the module import graph; the graph has no cycle, and no module
imports a layer above its own.

    python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

TPC = Path(__file__).resolve().parents[1] / "tpc"

# What each package may import of tpc (itself always); a package not listed may import anything.
ALLOWED = {
    "tpc.errors": set(),
    "tpc.version": set(),
    "tpc.record": set(),  # Role, Compaction and their accessors: below graph/ and passes/
    "tpc.methods": set(),
    "tpc.registry": {"tpc.errors", "tpc.methods"},  # capabilities, readable without importing a pass
    "tpc.schedule": {"tpc.errors"},
    "tpc.graph": {"tpc.errors", "tpc.record"},
    "tpc.passes": {"tpc.errors", "tpc.record", "tpc.registry", "tpc.graph", "tpc.methods", "tpc.schedule"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in TPC.rglob("*.py"):
        parts = list(path.relative_to(TPC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@functools.cache  # read once for every test here
def import_graph() -> dict[str, set[str]]:
    """Module -> the tpc modules it imports (``from pkg import sub`` is an edge to ``pkg.sub``)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges |= {t for t in map(resolve, targets) if t and t != name and t.startswith("tpc")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                module)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, imported in import_graph().items():
        package = package_of(module)
        if package not in ALLOWED:
            continue
        upward += [f"{module} -> {t}" for t in sorted(imported) if package_of(t) not in ALLOWED[package] | {package}]
    assert upward == []


def test_graph_reads_roles_through_the_record_module_only():
    """graph/ imports nothing from passes/ (the printing reads roles through tpc.record)."""
    graph = import_graph()
    assert not [m for m in graph if m.startswith("tpc.graph") for t in graph[m] if t.startswith("tpc.passes")]
    assert "tpc.record" in graph["tpc.graph.printing"]


def test_the_api_is_the_public_surface_and_the_pipeline_is_shared():
    """tpc/api.py is the surface users call (tpc.compile/inspect/export): inside tpc only the package
    and the CLI's commands import it, never tune or the VLM and decoder paths, which call the one
    pipeline (tpc/pipeline.py) the API calls too."""
    graph = import_graph()
    assert {m for m, imported in graph.items() if "tpc.api" in imported} <= {"tpc", "tpc.cli"} | {
        m for m in graph if m.startswith("tpc.commands.")}
    users = {m.split(".")[1] for m, imported in graph.items() if "tpc.pipeline" in imported}
    assert {"api", "tune", "vlm", "decode"} <= users
