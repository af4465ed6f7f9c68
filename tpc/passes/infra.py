"""Pass infrastructure, after ``torch.fx.passes.infra``.

A pass is a callable ``(GraphModule) -> PassResult``; a ``PassManager`` runs an ordered
list of them and, when one fails, names the failing pass (its name carries the layer, e.g.
``insert_prune(layer 23)``); the passes that ran before it go to the debug log only. A
``TpcError`` (a deliberate refusal) reaches the user as one; any other exception is a bug in
tpc and is raised as ``TpcInternalError`` naming the pass and, where the pass marked it with
``at_node``, the node it was working on.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import fx

from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.graph.nodes import describe

logger = logging.getLogger("tpc.passes")


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class Pass(abc.ABC):
    """Base class: subclasses set ``name`` and implement ``call``."""

    name = "pass"

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

    def __init__(self, passes: Sequence[Callable[[fx.GraphModule], PassResult]]):
        self.passes = list(passes)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            name = pass_name(p)
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
            modified |= result.modified
            logger.debug("%s: %s", name, "modified the graph" if result.modified else "no change")
            done.append(name)
        return PassResult(gm, modified)

    @staticmethod
    def _log_failure(name: str, done: list[str]) -> None:
        logger.debug("pass %s failed after %s", name, ", ".join(done) if done else "no other pass")
