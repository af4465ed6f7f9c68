"""``Builder``: how a pass inserts nodes, each with a :class:`~tpc.record.Role` and fake value.

The records passes leave (``Compaction``, roles, rewritten marks) live in :mod:`tpc.record`,
below ``graph/`` and ``passes/``; they are re-exported here for the passes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode

from tpc.graph.nodes import val
from tpc.record import (Compaction, Role, attach, compactions, is_rewritten, mark_pruned_outputs,  # noqa: F401
                        mark_rewritten, pruned_outputs, role_of, set_role)

class Builder:
    """Inserts nodes one after another, computing their fake values as it goes; each has a role."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, like: fx.Node | None = None):
        """Insert after ``anchor``; each node takes the ``nn_module_stack`` of ``like`` (default: the anchor)."""
        self.graph = gm.graph
        self.cursor = anchor
        self.like = like if like is not None else anchor
        values = [val(anchor)] + [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
        self.fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
        self.inserted: list[fx.Node] = []

    def op(self, target, *args, role: Role, value=None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, tuple(args))
        if value is None:
            with self.fake_mode:
                value = target(*fx.node.map_aggregate(args, lambda a: val(a) if isinstance(a, fx.Node) else a))
        node.meta["val"] = value
        node.meta["nn_module_stack"] = self.like.meta.get("nn_module_stack", {})
        set_role(node, role)
        self.cursor = node
        self.inserted.append(node)
        return node


def merge_sizes(merge: fx.Node) -> fx.Node:
    """The sizes output of a merge node; created right after it when dead-code elimination removed it."""
    for user in merge.users:
        if user.target is operator.getitem and user.args[1] == 1:
            return user
    with merge.graph.inserting_after(merge):
        node = merge.graph.call_function(operator.getitem, (merge, 1))
    node.meta.update(val=val(merge)[1], nn_module_stack=merge.meta.get("nn_module_stack", {}))
    set_role(node, Role.GATHER)
    return node
