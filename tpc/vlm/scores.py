"""``PrefillScores``: a VLM's pruned prefill also returns, per decoder layer, the scores its KV-eviction rule ranks by.

A compressed KV cache (H2O, SnapKV, Scissorhands: ``tpc/decode/eviction.py``) ranks the prompt's
cached positions by the attention the prompt's own queries gave them, which the prefill computes
and the decode step never sees. Rewrite rule (one per decoder layer of the language model, after its
SDPA, which stays as it is)::

    q [B, H, S', d] ───────────────────────┐
    the layer's cached keys [B, Hkv, S', d] ┼─► tpc::<score>(·, ·, mask, scale, window) ─► extra output
    mask [B, 1, S', S'] ────────────────────┘

The keys are the ones the prefill returns for the cache (rotary applied, one per KV head), which the
SDPA reads repeated over the query heads of each group; ``<score>`` is ``attention_mass`` or
``below_mean_counts`` (``tpc/decode/ops.py``), the ops the decode step's ``EvictionScores`` inserts,
so prompt and generated queries are scored alike. The scores follow every other output, layer by
layer. Each layer must attend over exactly the keys it caches: visual tokens pruned before the
language model (or not at all); the caller refuses a stage inside it.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from tpc.decode import ops  # noqa: F401  (registers the tpc:: score ops)
from tpc.decode.graph import REPEAT
from tpc.errors import TpcError
from tpc.graph.nodes import describe, is_op
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role
from tpc.passes.infra import Pass, PassResult
from tpc.vlm.graph import decoder_layers

logger = logging.getLogger("tpc.passes")


class PrefillScores(Pass):
    """Rewrite rules, per decoder layer of the language model (its SDPA stays as it is):

    1. the layer's queries, the keys the prefill returns for its cache and its mask feed one
       ``tpc::<score>`` node (``attention_mass`` or ``below_mean_counts``), a scoring node;
    2. the scores follow every other output, layer by layer.

    Every layer is checked before anything is inserted: a layer whose attention does not read its
    cached keys under one mask is refused in one line and the graph is left as it was. A rule without
    scores (streaming) matches nothing."""

    def __init__(self, score: str | None, window: int):
        self.score, self.window = score, window
        self.name = f"prefill_scores({score}, window {window})"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.score is None:  # a rule without scores (streaming): the prefill as it is
            return PassResult(gm, False)
        op = getattr(torch.ops.tpc, self.score).default
        output = gm.graph.output_node()
        outputs = list(output.args[0])
        layers = []
        for layer in decoder_layers(gm):
            keys = outputs[1 + 2 * layer.index]  # (logits, k_0, v_0, k_1, v_1, …, kept positions)
            read = layer.k
            while is_op(read, *REPEAT) and read is not keys:
                read = read.args[0]
            if read is not keys or layer.mask is None:
                raise TpcError(f"decoder layer {layer.index}'s attention, {describe(layer.attention)}, does not read "
                               "the keys the prefill caches under one mask: a compressed KV cache scores stock "
                               "attention; decode this model with a dense cache or decode={'method': 'tidal'}")
            layers.append((layer, keys))
        scores = [Builder(gm, layer.attention).op(op, layer.q, keys, layer.mask, layer.scale, self.window,
                                                  role=Role.SCORING) for layer, keys in layers]
        output.args = ((*outputs, *scores),)
        finish(gm, start=scores[0])  # only the language model's nodes from the first score on
        logger.debug("%s: %d decoder layers return their scores", self.name, len(scores))
        return PassResult(gm, True)
