"""``fuse_attention_scores``: take the attention each key receives from the layer's own SDPA.

A scorer that sums attention probabilities over the queries (topk-mass) recomputes
softmax(q·kᵀ·s) next to an SDPA that already computes it. ``tpc.sparse_attention`` with
every key returns the SDPA's output and that column sum from the one pass over q·kᵀ:

    o = sdpa(q, k, v, scale=s)                    fused = tpc.sparse_attention(q, k, v, None, s)
    …                                 ==>         o = fused[0]                      (model compute)
    p = tpc.attention_probs(q, k, s, None)        mass = fused[1]                   (scoring)
    mass = sum(p, [-2])                           …

1. only when the SDPA has no mask, no causal flag, no grouped or merged heads ([B, H, N, d]
   q, k and v of the same shape), and the probabilities are of exactly its q, k and scale and
   read by nothing else; anything else stays as it is (``modified=False`` when nothing matched);
2. the fused node replaces the SDPA in place (marked rewritten, role model compute); it runs
   after every pruning pass, so the attention finder never meets ``tpc.sparse_attention``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tpc.graph import AttentionSite, find_attention_sites
from tpc.graph.nodes import aten, is_op, val
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role, mark_rewritten
from tpc.passes.infra import Pass, PassResult

tpc_ops = torch.ops.tpc


def _fusable(site: AttentionSite) -> bool:
    return (site.kind == "sdpa" and site.mask is None and not site.is_causal and len(val(site.q).shape) == 4
            and val(site.k).shape == val(site.v).shape and val(site.q).shape[1] == val(site.k).shape[1])


def _column_sums(site: AttentionSite) -> fx.Node | None:
    """The ``sum(attention_probs(q, k, scale, None), [-2])`` node over this site's q and k, if any."""
    for probs in site.q.users:
        if (probs.target is tpc_ops.attention_probs.default and probs.args[1] is site.k
                and probs.args[2] == site.scale and probs.args[3] is None and len(probs.users) == 1):
            (total,) = probs.users
            if is_op(total, aten.sum) and list(total.args[1]) in ([-2], [2]) and len(total.args) == 2:
                return total
    return None


class FuseAttentionScores(Pass):
    name = "fuse_attention_scores"
    runs_after = ("InsertPrune", "ProportionalAttention")  # fuses the scores of every compaction, after ToMe's bias

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for site in find_attention_sites(gm):
            if not _fusable(site):
                continue
            total = _column_sums(site)
            if total is None:
                continue
            b = Builder(gm, site.node)
            fused = b.op(tpc_ops.sparse_attention.default, site.q, site.k, site.v, None, site.scale, role=Role.MODEL)
            out = b.op(operator.getitem, fused, 0, role=Role.MODEL, value=val(site.node))
            mass = b.op(operator.getitem, fused, 1, role=Role.SCORING)
            mark_rewritten(fused)
            mark_rewritten(out)
            site.node.replace_all_uses_with(out)
            total.replace_all_uses_with(mass)
            changed = True
        if changed:
            finish(gm)
        return PassResult(gm, changed)
