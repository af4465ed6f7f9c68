"""Carry a compaction's smaller token count through the graph (the second half of ``insert_prune``).

torch.export bakes the token count into shape arguments (``reshape(x, [s0, 197, 3, 6, 64])``).
After ``insert_prune`` replaced a stream tensor by ``gather_tokens(x, index)`` with K < N
tokens, this pass walks every downstream node in topological order, tracking which dims
carry tokens (see :mod:`tpc.passes.token_axis_rules`), and

1. rewrites constant shape arguments at token dims: N·f → K·f, a symbolic size → -1;
2. gathers side tensors that meet the stream with the same index — attention masks,
   position biases, rotary cos/sin tables, or stale copies of the stream from before the
   compaction (see ``gather_side``);
3. refuses, naming the node and its module, any op it cannot prove correct (a reshape back
   to an H×W grid, a read of token i, a concatenation along tokens, …).

It is not a pass of its own: ``insert_prune`` calls :func:`propagate` right after inserting
a compaction, so no pass ever sees a graph whose shape constants still say N.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch._guards import detect_fake_mode

from tpc.errors import TpcError
from tpc.graph import find_attention_sites, find_stream_point
from tpc.graph.attention import layer_runs
from tpc.graph.nodes import aten, describe, numeric_shape, to_front, val
from tpc.passes.compaction import Compaction, Role, mark_pruned_outputs, mark_rewritten, set_role
from tpc.passes.infra import at_node
from tpc.passes.token_axis_rules import Axis, Gather, Refusal, arguments, rule_for, set_argument

logger = logging.getLogger("tpc.passes")

GATHER = torch.ops.tpc.gather_tokens.default


class Propagation:
    """One compaction's propagation: the token axes of every tracked tensor, the old and new
    token counts, and the gathers of side tensors inserted so far."""

    def __init__(self, gm: fx.GraphModule, compaction: Compaction):
        source = compaction.out
        self.gm = gm
        self.graph = gm.graph
        self.tokens_old = compaction.tokens_in
        self.tokens_new = compaction.tokens_out
        self.prefix = compaction.prefix
        self.index = compaction.index
        self.source = source
        self.tracked: dict[fx.Node, object] = {source: {1: Axis()}}
        self.side_cache: dict[tuple, fx.Node] = {}
        self.index_cache: dict[int, fx.Node] = {0: self.index}
        self.inserted: set[fx.Node] = set()
        self.rewritten = 0
        self.batch = numeric_shape(source)[0]
        self.fake_mode = detect_fake_mode([val(source)])
        self.old_batch = val(source).shape[0]

    def atom_old(self, ax: Axis) -> int:
        return self.tokens_old - ax.offset

    def atom_new(self, ax: Axis) -> int:
        return self.tokens_new - ax.offset

    def axes_raw(self, node):
        return self.tracked.get(node) if isinstance(node, fx.Node) else None

    def axes(self, node) -> dict:
        a = self.axes_raw(node)
        return a if isinstance(a, dict) else {}

    def mark_rewritten(self, node: fx.Node) -> None:
        mark_rewritten(node)
        self.rewritten += 1

    def _insert(self, target, args, like: fx.Node, value) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta["val"] = value
        node.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        set_role(node, Role.GATHER)
        self.inserted.add(node)
        return node

    def old_index_val(self, offset: int):
        """A fake index in old terms (all N - offset positions), for fake values of inserted gathers."""
        with self.fake_mode:
            return torch.empty((self.old_batch, self.tokens_old - offset), dtype=torch.int64)

    def index_at(self, offset: int) -> fx.Node:
        """The kept positions counted from token ``offset`` on: ``index[:, offset:] - offset``.

        Prefix tokens are kept in place at the front, so for a tensor that starts after
        ``offset <= prefix`` tokens (``x[:, 1:]``, a per-patch table) this is its own index.
        """
        if offset not in self.index_cache:
            with self.graph.inserting_after(self.index), self.fake_mode:
                index_val = val(self.index)
                sliced = self._insert(aten.slice.Tensor, (self.index, 1, offset), self.index, index_val[:, offset:])
                with self.graph.inserting_after(sliced):
                    shifted = self._insert(aten.sub.Tensor, (sliced, offset), self.index, val(sliced) - offset)
            self.index_cache[offset] = shifted
        return self.index_cache[offset]

    def check_side(self, x: fx.Node, dim: int, ax: Axis, consumer: fx.Node) -> None:
        """Refuse unless ``gather_side`` can gather side tensor ``x`` along ``dim`` for ``consumer``."""
        if ax.inner != 1:
            raise Refusal("a side tensor meets tokens that are merged with another axis")
        if ax.offset < 0:
            raise Refusal("a side tensor meets tokens that were put in front of the stream after pruning")
        if (x, dim) not in self.side_cache:
            self._side_layout(x, dim, consumer)

    def _side_layout(self, x: fx.Node, dim: int, consumer: fx.Node) -> tuple[int, int]:
        """How x meets the consumer's batch dim: (leading dims to add, dims from the right)."""
        out_shape = numeric_shape(consumer)
        if self.batch not in out_shape:
            raise Refusal("a side tensor meets the tokens where no batch dimension is visible")
        from_right = len(out_shape) - out_shape.index(self.batch)
        added = max(0, from_right - len(val(x).shape))
        bdim = len(val(x).shape) + added - from_right
        if bdim >= added and numeric_shape(x)[bdim - added] not in (self.batch, 1):
            raise Refusal("a side tensor meets the tokens with a batch dimension of another size")
        return added, from_right

    def gather_side(self, x: fx.Node, dim: int, ax: Axis, consumer: fx.Node) -> fx.Node:
        """Gather side tensor ``x`` along ``dim`` with this compaction's index (cached per tensor),
        once ``check_side`` allowed it.

        Side tensors are what meets the stream at a token dim with the old token count without
        descending from the stream: attention masks, position biases, stale copies of the
        stream, and rotary position tables. For rotary embeddings this is the one rule for
        every layout: the cos/sin rows (a per-patch [N, D] table of a 2-D ViT rope such as
        EVA-02's, or a [B, N, D] table built from ``position_ids`` in a decoder's
        ``apply_rotary_pos_emb``) are gathered with the kept tokens, so each kept token keeps
        the rotary position it had, and every q·k rotary distance is the unpruned model's.

        x is right-aligned with the consumer's output; its dim facing the batch dim (size B
        or 1) is where each example's index applies. Missing leading dims are added first.
        A token axis sliced past ``offset`` prefix tokens uses ``index_at(offset)``.
        """
        key = (x, dim)
        if key in self.side_cache:
            return self.side_cache[key]
        added, from_right = self._side_layout(x, dim, consumer)
        index = self.index_at(ax.offset)
        with self.graph.inserting_before(consumer), self.fake_mode:
            y, tdim = x, dim + added
            for _ in range(added):
                y = self._insert(aten.unsqueeze.default, (y, 0), consumer, val(y).unsqueeze(0))
            rank = len(val(y).shape)
            bdim = rank - from_right
            perm, inverse = to_front(rank, bdim, tdim)
            if perm != list(range(rank)):
                y = self._insert(aten.permute.default, (y, perm), consumer, val(y).permute(perm))
            g = self._insert(GATHER, (y, index), consumer, GATHER(val(y), self.old_index_val(ax.offset)))
            if inverse != list(range(rank)):
                g = self._insert(aten.permute.default, (g, inverse), consumer, val(g).permute(inverse))
        self.tracked[g] = {**{d + added: a for d, a in self.axes(x).items()}, tdim: ax}
        self.side_cache[key] = g
        return g


def propagate(gm: fx.GraphModule, compaction: Compaction, place: str | None = None) -> int:
    """Propagate one compaction through every node after it; returns the number of rewritten nodes.
    ``place``: where the compaction is, for refusals, when it is not after an encoder layer
    (a VLM's cut: "after decoder layer 1"); its refusals then name no other layer to prune after."""
    ctx = Propagation(gm, compaction)
    nodes = list(gm.graph.nodes)
    for node in nodes[nodes.index(compaction.out) + 1:]:
        if node in ctx.inserted:
            continue
        if node.op == "output":
            _check_outputs(gm, ctx, node)
            continue
        if node.op != "call_function" or not any(a in ctx.tracked for a in node.all_input_nodes):
            continue
        rule = rule_for(node)
        if rule is None and getattr(node.target, "namespace", None) == "tpc":
            with at_node(node):  # another compaction's op downstream: the passes ran out of order, tpc's bug
                raise RuntimeError(f"tpc's own op {node.target} reads the tokens of the compaction at layer "
                                   f"{compaction.layer} and has no token-axis rule")
        if rule is None:
            raise TpcError(_refusal(node, "reads the tokens and tpc has no token-axis rule for this op", compaction, gm,
                                    place))
        try:
            with at_node(node):
                args = arguments(node)
                inferred = rule.infer(ctx, node, args)
                _gather_sides(ctx, node, args, inferred.gathers)
                if rule.resize is not None:
                    _resize(ctx, node, args, rule.resize(ctx, node, args, inferred.axes))
        except Refusal as r:
            raise TpcError(_refusal(node, str(r), compaction, gm, place)) from None
        if inferred.axes:
            ctx.tracked[node] = inferred.axes
    logger.debug("propagate_token_axis: layer %s, %d nodes rewritten or inserted",
                 compaction.layer, ctx.rewritten + len(ctx.inserted))
    return ctx.rewritten + len(ctx.inserted)


def _gather_sides(ctx: Propagation, node: fx.Node, args: dict, gathers: tuple[Gather, ...]) -> None:
    """Replace each side-tensor operand by its gather; an operand gathered along two dims (a
    mask along queries and keys) is gathered twice, the second time in the first's dims."""
    current: dict = {}
    for g in gathers:
        name, item = g.arg if isinstance(g.arg, tuple) else (g.arg, None)
        first = args[name] if item is None else args[name][item]
        x = current.get(g.arg, first)
        dim = g.dim + len(val(x).shape) - len(val(first).shape)
        current[g.arg] = ctx.gather_side(x, dim, g.axis, node)
    for key, new in current.items():
        set_argument(node, key, new)


def _resize(ctx: Propagation, node: fx.Node, args: dict, new: dict) -> None:
    """Write the size arguments a rule's ``resize`` changed; the node counts as rewritten."""
    changed = {name: value for name, value in new.items() if _as_list(value) != _as_list(args[name])}
    for name, value in changed.items():
        set_argument(node, name, value)
    if changed:
        ctx.mark_rewritten(node)


def _as_list(value):
    """Lists and tuples compare as lists (a size argument may be either)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_outputs(gm, ctx, node):
    outputs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
    pruned = [i for i, a in enumerate(outputs) if ctx.axes(a)]
    if pruned:
        mark_pruned_outputs(gm, pruned)
        logger.info("output(s) %s carry the token axis: they now hold %d tokens instead of %d",
                    pruned, ctx.tokens_new, ctx.tokens_old)


def _refusal(node: fx.Node, reason: str, compaction: Compaction, gm: fx.GraphModule, place: str | None) -> str:
    if place is not None:
        return f"cannot prune {place}: {describe(node)}: {reason}"
    return f"cannot prune after layer {compaction.layer}: {describe(node)}: {reason}. {_way_out(gm, node)}"


def _way_out(gm: fx.GraphModule, blocker: fx.Node) -> str:
    """What the user can do instead: the layers after which pruning never reaches ``blocker``,
    or --restore when the blocker only reads the final sequence."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = find_attention_sites(gm)
    if not sites:
        return "No layer of this model can be pruned before it"
    after = []
    for site in sites:
        try:
            point = find_stream_point(gm, site)
        except TpcError:
            continue
        if order[point.node] > order[blocker] and site.self_attention:
            after.append(site.layer)
    if after:
        return f"Prune after layers {layer_runs(after)} only: their tokens never reach this op"
    try:
        end = find_stream_point(gm, sites[-1], "block").node
    except TpcError:
        end = None
    if end is not None and order[end] < order[blocker]:
        return ("It reads the sequence after the last block: --restore (restore=True) brings every token back "
                "there, dropped ones unchanged")
    return "No layer of this model can be pruned before it"
