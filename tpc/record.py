"""What passes tell each other and the rest of tpc: one typed record per compaction, a role for
every inserted node, the model nodes a pass rewrote, the outputs that carry the kept tokens.

A compaction (``insert_prune`` at one layer) is described by a frozen :class:`Compaction`
kept on the node of the new stream; every node a pass inserts carries a :class:`Role`.
FLOPs, reports, printing, visualisation and later passes read these through this module only
(``compactions``, ``role_of``, ``is_rewritten``), never through metadata keys of their own.
It imports nothing of tpc, so ``graph/`` and ``passes/`` both sit above it.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

_RECORD = "tpc_compaction"
_ROLE = "tpc_role"
_REWRITTEN = "tpc_rewritten"


class Role(enum.Enum):
    """What an inserted node computes, for cost accounting and reports."""

    SCORING = "scoring"  # token scores and what feeds them (attention probabilities, PageRank, keys averaged)
    SELECTION = "selection"  # which tokens stay: top-k, greedy selections, matching, index bookkeeping
    GATHER = "gather"  # moving tokens: gathers, merges, fused token, restore, side-tensor gathers, layout glue
    MODEL = "model"  # the model's own computation, rewritten (ToMe's proportional attention, fused SDPA)


@dataclass(frozen=True)
class Compaction:
    """One N -> K change of the token count after a layer.

    ``out`` is the new stream ([B, tokens_out, C], before any permute back to a [N, B, C] stream's
    layout), ``index`` the [B, tokens_out] original position each output token stands for (side
    tensors are gathered with it), ``merge`` the ``tpc.merge_tokens`` node whose output 1 holds
    token sizes (ToMe), ``carries`` the earlier record whose token sizes a later gather carries on.

    Where only some tokens may go (a VLM's visual tokens, at per-example positions), ``prunable``
    marks them and ``spans`` holds each example's positions of them; ``tokens_in`` and ``tokens_out``
    then count those tokens (the prompt length is symbolic), ``index`` holds every kept token's
    position in the original prompt (composed over earlier compactions), and ``layer`` is the
    decoder layer the compaction follows (-1: before the language model).
    """

    layer: int
    method: str
    module: str
    out: fx.Node
    index: fx.Node
    tokens_in: int
    tokens_out: int
    prefix: int
    merge: fx.Node | None = None
    carries: Compaction | None = None  # a gather after a merge: the record whose token sizes it carries on
    prunable: fx.Node | None = None  # [B, S] bool: the tokens the method chose among (a VLM's visual tokens)
    spans: fx.Node | None = None  # [B, tokens_in]: each example's positions of those tokens in the stream


def attach(record: Compaction) -> None:
    record.out.meta[_RECORD] = record


def compactions(gm: fx.GraphModule) -> list[Compaction]:
    """The compaction records of the graph, in graph order."""
    return [n.meta[_RECORD] for n in gm.graph.nodes if _RECORD in n.meta]


def role_of(node: fx.Node) -> Role | None:
    """The role of a node a pass inserted; None for the model's own nodes."""
    return node.meta.get(_ROLE)


def set_role(node: fx.Node, role: Role) -> None:
    if not isinstance(role, Role):
        raise TypeError(f"role must be a tpc.passes.compaction.Role, not {role!r}")
    node.meta[_ROLE] = role


def mark_rewritten(node: fx.Node) -> None:
    """Mark a node of the model whose arguments a pass rewrote, or that replaces one in place."""
    node.meta[_REWRITTEN] = True


def is_rewritten(node: fx.Node) -> bool:
    return bool(node.meta.get(_REWRITTEN))


_PRUNED_OUTPUTS = "tpc_pruned_outputs"


def mark_pruned_outputs(gm: fx.GraphModule, outputs: list[int]) -> None:
    """Note graph outputs that carry the token axis (they hold the kept tokens only)."""
    gm.meta.setdefault(_PRUNED_OUTPUTS, set()).update(outputs)


def pruned_outputs(gm: fx.GraphModule) -> list[int]:
    return sorted(gm.meta.get(_PRUNED_OUTPUTS, ()))


_UNPRUNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_unpruned(gm: fx.GraphModule, make: Callable[[], fx.GraphModule]) -> None:
    """How to get the graph ``gm`` was before tpc pruned it: the artifact check runs it to tell a
    model whose own outputs are NaN from a pruning that made them so."""
    _UNPRUNED[gm] = make


def unpruned_of(gm: fx.GraphModule) -> fx.GraphModule | None:
    make = _UNPRUNED.get(gm)
    return None if make is None else make()
