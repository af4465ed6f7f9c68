"""Pass infrastructure, after ``torch.fx.passes.infra``.

A pass is a callable ``(GraphModule) -> PassResult``; a ``PassManager`` runs an ordered
list of them and, when one fails, names the failing pass (its name carries the layer, e.g.
``insert_prune(layer 23)``); the passes that ran before it go to the debug log only. A
``TpcError`` (a deliberate refusal) reaches the user as one; any other exception is a bug in
tpc and is raised as ``TpcInternalError`` naming the pass and, where the pass marked it with
``at_node``, the node it was working on.

Like torch.fx's ``PassManager`` constraints, a pass class declares the passes it must follow
(``runs_after``: class names); a list that breaks one is refused before anything runs. With
checking on (``check=True``, or the environment variable ``TPC_CHECK_PASSES=1``, which the test
suite sets) the manager enforces the rules of passes/README.md after every pass: each node it
inserted has a role (or is a model node it marked rewritten) and a module path, every fake value
is fresh (computed from the node's current op and inputs), and a pass that reports no change
left ``gm.code`` as it was.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import fx

from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.graph.nodes import describe, val
from tpc.record import is_rewritten, role_of

logger = logging.getLogger("tpc.passes")


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class Pass(abc.ABC):
    """Base class: subclasses set ``name`` and implement ``call``."""

    name = "pass"
    runs_after: tuple[str, ...] = ()  # class names of passes that must all run before this one

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite ``gm`` in place; say whether anything changed."""

    def __repr__(self) -> str:
        return self.name


def pass_name(p: Callable) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Remember ``node`` on any bug raised inside the block, so the report can name it."""
    try:
        yield
    except TpcError:
        raise
    except Exception as err:
        if not hasattr(err, "tpc_node"):
            err.tpc_node = node
        raise


class PassManager:
    """Runs passes in order; a failure names the pass (the ones before it: ``logger.debug``)."""

    def __init__(self, passes: Sequence[Callable[[fx.GraphModule], PassResult]], check: bool | None = None):
        self.passes = list(passes)
        self.check = os.environ.get("TPC_CHECK_PASSES", "") not in ("", "0") if check is None else check
        for i, p in enumerate(self.passes):
            late = [q for q in self.passes[i + 1:] if type(q).__name__ in getattr(p, "runs_after", ())]
            if late:
                raise TpcInternalError(f"pass {pass_name(p)} must run after every {type(late[0]).__name__}, but "
                                       f"{pass_name(late[0])} comes later in the list; {REPORT}")

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            name = pass_name(p)
            before = _snapshot(gm) if self.check and isinstance(gm, fx.GraphModule) else None
            try:
                result = p(gm)
            except TpcError as err:
                self._log_failure(name, done)
                raise TpcError(f"{err} [in pass {name}]") from err
            except Exception as err:
                self._log_failure(name, done)
                node = getattr(err, "tpc_node", None)
                where = f" at {describe(node)}" if isinstance(node, fx.Node) else ""
                first = (str(err).strip().splitlines() or [""])[0]
                raise TpcInternalError(
                    f"internal error in pass {name}{where}: {type(err).__name__}: {first}; {REPORT}"
                ) from err
            if not isinstance(result, PassResult):
                raise TpcInternalError(f"pass {name} returned {type(result).__name__}, not a PassResult; {REPORT}")
            gm = result.graph_module
            if before is not None:
                broken = broken_rules(gm, before, result.modified)
                if broken:
                    raise TpcInternalError(f"pass {name} broke the pass rules: {broken}; {REPORT}")
            modified |= result.modified
            logger.debug("%s: %s", name, "modified the graph" if result.modified else "no change")
            done.append(name)
        return PassResult(gm, modified)

    @staticmethod
    def _log_failure(name: str, done: list[str]) -> None:
        logger.debug("pass %s failed after %s", name, ", ".join(done) if done else "no other pass")


@dataclass
class Snapshot:
    code: str
    nodes: dict[fx.Node, tuple]  # node -> (its value, the op and inputs it was computed from)


def _computed_from(node: fx.Node) -> tuple:
    return node.target, str(node.args), str(node.kwargs), *(val(n) for n in node.all_input_nodes)


def _snapshot(gm: fx.GraphModule) -> Snapshot:
    return Snapshot(gm.code, {n: (val(n), _computed_from(n)) for n in gm.graph.nodes if n.op == "call_function"})


def _same(node: fx.Node, value, computed_from: tuple) -> bool:
    key = _computed_from(node)
    return value is val(node) and len(computed_from) == len(key) and computed_from[:3] == key[:3] \
        and all(a is b for a, b in zip(computed_from[3:], key[3:]))


def _fresh(node: fx.Node, before: Snapshot) -> bool:
    """Whether ``meta["val"]`` was computed from the node's current op and input values: by
    ``finish()``'s refresh (which records what it computed from), or untouched since before the pass."""
    refreshed = node.meta.get("tpc_val_key")
    return (refreshed is not None and _same(node, refreshed[0], refreshed[1:])) or (
        node in before.nodes and _same(node, *before.nodes[node]))


def broken_rules(gm: fx.GraphModule, before: Snapshot, modified: bool) -> str | None:
    """The first rule of passes/README.md a pass broke (see the module docstring), or None."""
    if not modified:
        return None if gm.code == before.code else "it reported no change but changed gm.code"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node not in before.nodes:
            if role_of(node) is None and not is_rewritten(node):
                return f"{describe(node)} was inserted without a role"
            if "nn_module_stack" not in node.meta:
                return f"{describe(node)} was inserted without a module path (nn_module_stack)"
        if not _fresh(node, before):
            return f"the fake value of {describe(node)} is stale (finish() refreshes it)"
    return None
