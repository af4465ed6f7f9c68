"""``EvictionScores``: the captured step also returns, per layer, the attention scores its eviction rule ranks by.

Rewrite rule (one per decoder layer, after its SDPA, which stays as it is)::

    q [B, H, T, d] ─┐
    cat(past_k, new_k) [B, Hkv, L + T, d] ─┼─► tpc::<score>(·, ·, mask, scale, window) ─► extra output
    mask [B, 1, T, L + T] ─┘

``<score>`` is ``attention_mass`` ([B, Hkv, L + T]) or ``below_mean_counts`` ([B, Hkv, W, L + T]),
from the layer's own q and rotated keys (SDPA returns no attention weights). The scores follow
the step's outputs, layer by layer, in the graph's flat output and in its pytree output spec.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils import _pytree as pytree

from tpc.decode import ops  # noqa: F401  (registers the tpc:: ops)
from tpc.decode.graph import cache_attention
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role
from tpc.passes.infra import Pass, PassResult

logger = logging.getLogger("tpc.passes")


class EvictionScores(Pass):
    def __init__(self, score: str | None, window: int):
        self.score, self.window = score, window
        self.name = f"eviction_scores({score}, window {window})"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.score is None:  # a rule without scores (streaming): the step as captured
            return PassResult(gm, False)
        op = getattr(torch.ops.tpc, self.score).default
        scores = []
        for site in cache_attention(gm):
            b = Builder(gm, site.sdpa)
            scores.append(b.op(op, site.q, site.keys, site.mask, site.scale, self.window, role=Role.SCORING))
        output = gm.graph.output_node()
        outputs = (*output.args[0], *scores)
        output.args = (outputs,)
        codegen = gm.graph._codegen
        if getattr(codegen, "pytree_info", None) is not None:  # the unflattened program returns a tuple
            codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_structure(tuple(outputs)))
        finish(gm)
        logger.debug("%s: %d layers return their scores", self.name, len(scores))
        return PassResult(gm, True)
