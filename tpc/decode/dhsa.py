"""``DHSADecode``: rewrite a captured decode step so each dhsa layer reads only the positions of its best chunks.

DHSA (Xiong, Zou, Fekri, Cho; NeurIPS 2025, arXiv 2510.24606, §3) at decode time, per dhsa layer l
(the plan's sparse layers, each its own selection layer; the others attend densely): the step takes
the layer's chunk summaries as two more inputs (each chunk's length-normalized key representation
sqrt(n) · mean of its keys, and its span; kept by the caller as the cache grows:
``tpc/decode/chunks.py``), and its SDPA over the whole cache is replaced by::

    reps_l [B, Hkv, C, d], spans_l [B, 2, C] (graph inputs, C = ceil(L / min_chunk))
    q_l, reps_l, spans_l ─► tpc::chunk_scores ─► [B, Hkv, C]      (q · k̄_c, summed over a KV head's G query heads)
        ─► tpc::chunk_positions(·, spans_l, mask, N_b) ─► index [B, Hkv, K]
           (the chunk scores upsampled to their positions, the N_b best positions: K = min(N_b, L); a ratio r
            of the cache is N_b = ceil(r × L), computed in the graph from the symbolic L)
    past_k_l ─► gather_positions(index) ─► cat(·, new_k_l) ─┐
    past_v_l ─► gather_positions(index) ─► cat(·, new_v_l) ─┤
    mask ─► gather_positions(index) ─► cat(·, mask[new]) ───┤
    q_l [B, H, 1, d] ─► reshape [B, Hkv, G, d] ─────────────► SDPA ─► reshape [B, H, 1, d]

One selection per KV head (the score summed over its G query heads), so a KV head's gathered
cache serves its G query heads, as quest and tidal do for grouped-query attention. The step's
inputs become (input_ids, position_ids, attention_mask, past, chunks), ``chunks`` the flat list
[reps, spans, …] of the dhsa layers in layer order; nothing in the step reads a dhsa layer's whole cache.
"""

from __future__ import annotations

import torch
from torch import fx

from tpc.decode import chunk_ops  # noqa: F401  (registers the tpc:: chunk ops)
from tpc.decode.chunk_ops import chunk_slots
from tpc.decode.graph import CacheAttention
from tpc.decode.plan import Plan, describe_budget
from tpc.decode.rewrite import OwnSelectionDecode, add_step_inputs, budget, gathered_cache, gathered_mask
from tpc.passes.compaction import Builder, Role

tpc = torch.ops.tpc


class DHSADecode(OwnSelectionDecode):
    def __init__(self, plan: Plan, ideal: bool = False):
        super().__init__(plan, ideal)
        low, high, threshold = plan.chunk
        self.name = (f"dhsa_decode(chunks of {low}-{high}, threshold {threshold:g}, {describe_budget(plan.keep)}"
                     f"{', ideal' if ideal else ''})")

    def side_inputs(self, gm: fx.GraphModule, sites: list[CacheAttention]) -> dict:
        return _chunk_inputs(gm, sites, self.plan.chunk[0])

    def read(self, b: Builder, site: CacheAttention, inputs: tuple) -> tuple:
        reps, spans = inputs
        scores = b.op(tpc.chunk_scores.default, site.q, reps, spans, role=Role.SCORING)
        index = b.op(tpc.chunk_positions.default, scores, spans, site.mask, budget(b, site, self.plan.keep),
                     role=Role.SELECTION)
        return *gathered_cache(b, site, index), gathered_mask(b, site, index)


def _chunk_inputs(gm: fx.GraphModule, sites: list[CacheAttention], min_chunk: int) -> dict[int, tuple]:
    """Two new graph inputs per dhsa layer, its chunk representations [B, Hkv, C, d] (float32) and spans
    [B, 2, C] (int64), C = ceil(L / min_chunk), after the cache's inputs."""
    def reps(keys):
        return torch.empty(keys.shape[0], keys.shape[1], chunk_slots(keys.shape[2], min_chunk), keys.shape[3])

    def spans(keys):
        return torch.empty(keys.shape[0], 2, chunk_slots(keys.shape[2], min_chunk), dtype=torch.int64)

    made = add_step_inputs(gm, [(f"chunk_{kind}_{site.layer}", make) for site in sites
                                for kind, make in (("reps", reps), ("spans", spans))])
    return {site.layer: (made[2 * i], made[2 * i + 1]) for i, site in enumerate(sites)}
