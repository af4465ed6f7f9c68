"""tpc's module layers, read from the source: every import (module level, inside functions, under
TYPE_CHECKING) is an edge of the module import graph; the graph has no cycle, and no module
imports a layer above its own. An import sits inside a function only where what it imports needs
a dependency the base install lacks (transformers, timm, tensorrt, triton, ...).

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


@functools.cache
def modules() -> dict[str, Path]:
    out = {}
    for path in TPC.rglob("*.py"):
        parts = list(path.relative_to(TPC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


FUNCTION, TOP, TYPE_CHECKING = "function", "top", "type-checking"  # where an import statement runs


@functools.cache  # read once for every test here
def imports() -> tuple[tuple[str, int, str, str], ...]:
    """Every import statement in tpc as (module, line, imported module, where): ``where`` is
    FUNCTION inside a function, TYPE_CHECKING under ``if TYPE_CHECKING:``, else TOP (it runs
    when the module is imported). ``from pkg import sub`` imports ``pkg.sub``; a third-party
    module keeps its dotted name."""
    mods = modules()
    out = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def targets(node):
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]

        def visit(nodes, where):
            for node in nodes:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.extend((name, node.lineno, t, where) for t in targets(node))
                elif isinstance(node, ast.If) and where == TOP and "TYPE_CHECKING" in ast.unparse(node.test):
                    visit(node.body, TYPE_CHECKING)
                    visit(node.orelse, TOP)
                else:
                    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
                    visit(ast.iter_child_nodes(node), FUNCTION if isinstance(node, functions) else where)

        visit([ast.parse(path.read_text())], TOP)
    return tuple(out)


def tpc_module(name: str) -> str | None:
    """The tpc module (file) an imported name lives in, or None for a name outside tpc."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name if name and name.split(".")[0] == "tpc" else None


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the tpc modules it imports, wherever the import statement is."""
    graph = {name: set() for name in modules()}
    for module, _, target, _ in imports():
        t = tpc_module(target)
        if t and t != module:
            graph[module].add(t)
    return graph


# What `pip install -e .` lacks (pyproject.toml: the base install is torch, numpy, onnx, onnxscript,
# onnxruntime): the extras, and what they bring (huggingface_hub), and the Triton server's own module.
# Triton counts as optional: the kernels must import on a machine without a GPU.
OPTIONAL = {"transformers", "timm", "torchvision", "tensorrt", "triton", "matplotlib", "PIL", "pytriton",
            "tritonclient", "triton_python_backend_utils", "gguf", "accelerate", "safetensors", "huggingface_hub"}



def with_packages(module: str) -> set[str]:
    """``module`` and the packages above it: importing it runs each of their ``__init__``."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules().keys()


@functools.cache
def runs_at_import() -> dict[str, set[str]]:
    """Module -> the tpc modules importing it runs directly: its packages, and what its module-level
    imports name (with their packages)."""
    runs = {m: with_packages(m) - {m} for m in modules()}
    for module, _, target, where in imports():
        if where == TOP and tpc_module(target):
            runs[module] |= with_packages(tpc_module(target)) - {module}
    return runs


@functools.cache
def optional_needs() -> dict[str, frozenset[str]]:
    """Module -> the optional dependencies importing it imports: its own module-level imports, and
    those of every tpc module it runs on the way."""
    needs = {m: set() for m in modules()}
    for module, _, target, where in imports():
        if where == TOP and target.split(".")[0] in OPTIONAL:
            needs[module].add(target.split(".")[0])
    return propagate(needs, runs_at_import())


def propagate(needs: dict[str, set[str]], runs: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    """To the fixed point: a module needs what the modules it runs need."""
    needs = {m: set(n) for m, n in needs.items()}
    changed = True
    while changed:
        changed = False
        for module in needs:
            more = set().union(*(needs[m] for m in runs[module])) - needs[module]
            if more:
                needs[module] |= more
                changed = True
    return {m: frozenset(n) for m, n in needs.items()}


def optional_dependencies_of(target: str) -> frozenset[str]:
    """The optional dependencies importing ``target`` (a module name, tpc's or not) imports."""
    if target.split(".")[0] in OPTIONAL:
        return frozenset({target.split(".")[0]})
    return optional_needs()[tpc_module(target)] if tpc_module(target) else frozenset()


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


def test_an_import_inside_a_function_defers_an_optional_dependency():
    """Imports sit at the top of the module, where a reader sees what it depends on, except where the
    imported module needs a dependency the base install lacks (transformers, timm, tensorrt, triton,
    matplotlib, PIL, pytriton, ...): then `import tpc` and every command that does not use it work
    without it. The CLI's commands are not imported by statements: tpc/cli.py resolves each through
    one table with importlib, so `tpc --help` and argument errors load no command."""
    path = {m: p.relative_to(TPC.parent) for m, p in modules().items()}
    inside = [f"{path[module]}:{line} imports {target}" for module, line, target, where in imports()
              if where == FUNCTION and not optional_dependencies_of(target)]
    assert inside == []


def test_optional_dependencies_are_found_through_the_modules_imported():
    assert propagate({"a": set(), "b": set(), "c": {"x"}, "d": {"y"}}, {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}) \
        == {"a": {"x"}, "b": {"x"}, "c": {"x"}, "d": {"x", "y"}}
    needs = optional_needs()
    assert needs["tpc.kernels.triton_kernels"] == {"triton"}
    assert needs["tpc.exports.tensorrt_plugins"] == {"tensorrt"}
    assert needs["tpc"] == set()  # `import tpc` works on the base install
