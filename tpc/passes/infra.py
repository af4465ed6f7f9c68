"""Pass infrastructure, after ``torch.fx.passes.infra``.

A pass is a callable ``(GraphModule) -> PassResult``; a ``PassManager`` runs an ordered
list of them and, when one fails, names the failing pass (its name carries the layer, e.g.
``insert_prune(layer 23)``); the passes that ran before it go to the debug log only.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from tpc.errors import TpcError

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
                raise TpcError(f"pass {name} failed: {type(err).__name__}: {err}") from err
            gm = result.graph_module
            modified |= result.modified
            logger.debug("%s: %s", name, "modified the graph" if result.modified else "no change")
            done.append(name)
        return PassResult(gm, modified)

    @staticmethod
    def _log_failure(name: str, done: list[str]) -> None:
        logger.debug("pass %s failed after %s", name, ", ".join(done) if done else "no other pass")
