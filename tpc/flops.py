"""FLOPs counted from a graph's shapes, at batch 1 (and, for a graph with a symbolic sequence
length, at the length of the example inputs it was captured with).

Counts multiply-accumulates (the convention of the ViT/DeiT papers, where DeiT-S is
4.6 GFLOPs) for the ops that dominate a transformer: linear, matmul, convolution and
attention (SDPA, or ``tpc::sparse_attention`` where topk-mass fused it). Each node's MACs go
to the role a pass gave it (:class:`tpc.passes.compaction.Role`): the model's own nodes and
rewritten model computation (ToMe's proportional attention, the fused SDPA) are model
compute; scoring, selection and gathers are the pruning overhead. Of the ``tpc::`` scorers
only ``cls_attention``, ToMe's ``bipartite_match`` (the cosine similarity of every set-A key
to every set-B key) and the VLM's ``last_token_attention`` (FastV's one query row, counted in
tpc/vlm/ops.py) have a MAC count; ``attention_probs`` (zero-tprune's q·kᵀ beside an SDPA) and
the other graph methods' scorers (PageRank, greedy selections) are not counted here — their
cost is measured as run time instead (``tpc bench``'s "inserted" share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tpc.graph.nodes import aten, input_symbols, size_at, target_packet, val
from tpc.record import Role, role_of


def _concrete(x, sizes: dict | None = None) -> tuple[int, ...]:
    """Concrete shape: symbolic sizes evaluated with ``sizes`` (symbol -> value), others set to 1."""
    return tuple(example_size(s, sizes or {}) for s in x.shape)


def example_size(size, sizes: dict) -> int:
    """One size (an int or SymInt) at the example values ``sizes`` (see ``example_sizes``)."""
    return size_at(size, lambda sym: sizes.get(sym, 1))


def example_sizes(gm: fx.GraphModule) -> dict:
    """Symbol -> value for the FLOP count: the batch 1, every other symbol (a sequence length) its
    value in the example inputs the graph was captured with."""
    sizes = {}
    batch = set()
    for _, d, s in input_symbols(gm):
        if d == 0:
            batch.add(s.node.expr)
        else:
            sizes[s.node.expr] = int(s.node.shape_env.backed_var_to_val.get(s.node.expr, 1))
    return {sym: v for sym, v in sizes.items() if sym not in batch}


def node_macs(node: fx.Node, sizes: dict | None = None) -> int:
    if node.op != "call_function":
        return 0
    packet = target_packet(node)
    out = val(node)
    args = [val(a) if isinstance(a, fx.Node) else a for a in node.args]

    def _shape(x):
        return _concrete(x, sizes)

    def _numel(x):
        return math.prod(_concrete(x, sizes))

    if packet is aten.linear:
        return _numel(out) * _shape(args[0])[-1]
    if packet in (aten.matmul, aten.bmm, aten.mm):
        return _numel(out) * _shape(args[0])[-1]
    if packet in (aten.addmm, aten.baddbmm):
        return _numel(out) * _shape(args[1])[-1]
    if packet in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution):
        weight = _shape(args[1])
        return _numel(out) * math.prod(weight[1:])
    if packet is aten.scaled_dot_product_attention:
        q, k, v = (_shape(a) for a in args[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    cost = TPC_OP_MACS.get(packet) or DECODE_OP_MACS.get(getattr(packet, "_qualified_op_name", None))
    return cost(node, sizes) if cost is not None else 0


@dataclass
class FlopCount:
    total: int
    by_role: dict[Role, int]  # MACs per role; the model's own nodes count as Role.MODEL

    @property
    def scoring(self) -> int:
        """The pruning overhead: every MAC that is not model compute."""
        return self.total - self.by_role[Role.MODEL]

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_flops(gm: fx.GraphModule, sizes: dict | None = None) -> FlopCount:
    """MACs of ``gm`` at ``sizes`` (symbol -> value; default ``example_sizes``: batch 1, the
    example's sequence length), per role."""
    by_role = dict.fromkeys(Role, 0)
    sizes = example_sizes(gm) if sizes is None else sizes
    for node in gm.graph.nodes:
        by_role[role_of(node) or Role.MODEL] += node_macs(node, sizes)
    return FlopCount(sum(by_role.values()), by_role)


def cls_attention_macs(node: fx.Node, sizes: dict | None = None) -> int:
    q, k = (_concrete(val(a), sizes) for a in node.args[:2])
    return q[0] * q[1] * k[-2] * q[-1]


def sparse_attention_macs(node: fx.Node, sizes: dict | None = None) -> int:
    q, k = (_concrete(val(a), sizes) for a in node.args[:2])
    keys = k[-2] if node.args[3] is None else _concrete(val(node.args[3]), sizes)[-1]
    return math.prod(q[:-1]) * keys * 2 * q[-1]


def bipartite_match_macs(node: fx.Node, sizes: dict | None = None) -> int:
    """ToMe's scores (Bolya et al., ICLR 2023, Sec. 3): set A (even tokens) · set Bᵀ (odd tokens) of
    the normalized keys, [B, ceil(N/2), C] x [B, C, floor(N/2)]; r = 0 matches nothing."""
    if node.args[1] == 0:
        return 0
    b, n, c = _concrete(val(node.args[0]), sizes)
    return b * ((n + 1) // 2) * (n // 2) * c


def window_scores_macs(node: fx.Node, sizes: dict | None = None) -> int:
    """A KV-eviction score (``tpc::attention_mass``, ``tpc::below_mean_counts``): the last ``window`` of the
    T queries [B, H, T, d] against the N keys, q·kᵀ."""
    b, h, t, d = _concrete(val(node.args[0]), sizes)
    keys = _concrete(val(node.args[1]), sizes)[2]
    return b * h * min(node.args[4], t) * keys * d


# MAC counts of the tpc:: ops that compute (gathers and selections move memory only).
TPC_OP_MACS = {
    torch.ops.tpc.cls_attention: cls_attention_macs,
    torch.ops.tpc.sparse_attention: sparse_attention_macs,
    torch.ops.tpc.bipartite_match: bipartite_match_macs,
}
# The decode ops (tpc/decode/ops.py) by name: this module is imported before they are registered.
DECODE_OP_MACS = {"tpc::attention_mass": window_scores_macs, "tpc::below_mean_counts": window_scores_macs}
