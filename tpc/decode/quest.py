"""``QuestDecode``: rewrite a captured decode step so each quest layer reads only the pages its query selects.

Quest (Tang et al., ICML 2024, arXiv 2406.10774, §3, Alg. 1), per quest layer l (the plan's
selection layers; the others attend densely), its SDPA over the whole cache replaced by::

    past_k_l, mask ─► tpc::page_bounds(·, page) ─► bounds [B, Hkv, 2, P, d]  (min and max per page)
    q_l, bounds, mask ─► tpc::page_scores ─► [B, Hkv, P] ─► tpc::top_pages(·, ceil(keep / page))
        ─► pages [B, Hkv, K] ─► tpc::page_positions ─► index [B, Hkv, K · page]
    past_k_l ─► gather_positions(index) ─► cat(·, new_k_l) ─┐
    past_v_l ─► gather_positions(index) ─► cat(·, new_v_l) ─┤
    mask ─► tpc::page_mask(·, pages) ──────────────────────────┤  (padding and positions past the cache hidden)
    q_l [B, H, 1, d] ─► reshape [B, Hkv, G, d] ─────────────► SDPA ─► reshape [B, H, 1, d]

The page score is summed over the G query heads of a KV head (one set of pages per KV head,
as ``tidal`` ranks per KV group), so a KV head's gathered cache serves its G query heads.
``page_bounds`` reads every cached key of the layer: the bounds are computed in the step,
not kept alongside the cache (docs/decode.md says what that costs).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from tpc.decode import page_ops  # noqa: F401  (registers the tpc:: page ops)
from tpc.decode.graph import cache_attention
from tpc.decode.plan import Plan
from tpc.decode.rewrite import attend_grouped, gathered_cache
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role
from tpc.passes.infra import Pass, PassResult

logger = logging.getLogger("tpc.passes")
tpc = torch.ops.tpc


class QuestDecode(Pass):
    def __init__(self, plan: Plan, ideal: bool = False):
        self.plan, self.ideal = plan, ideal
        self.name = f"quest_decode(page {plan.page}, {plan.pages} pages{', ideal' if ideal else ''})"

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = {a.layer: a for a in cache_attention(gm)}
        for layer in self.plan.sparse:
            site = sites[layer]
            b = Builder(gm, site.sdpa.prev)
            b.like = site.sdpa
            if self.ideal:
                attend_grouped(gm, b, site, site.keys, site.values, None)
                continue
            page = self.plan.page
            bounds = b.op(tpc.page_bounds.default, site.past_k, site.mask, page, role=Role.SCORING)
            scores = b.op(tpc.page_scores.default, site.q, bounds, site.mask, page, role=Role.SCORING)
            pages = b.op(tpc.top_pages.default, scores, self.plan.pages, role=Role.SELECTION)
            index = b.op(tpc.page_positions.default, pages, site.mask, page, role=Role.SELECTION)
            keys, values = gathered_cache(b, site, index)
            mask = b.op(tpc.page_mask.default, site.mask, pages, page, role=Role.GATHER)
            attend_grouped(gm, b, site, keys, values, mask)
        finish(gm)
        logger.debug("%s: quest layers %s", self.name, self.plan.sparse)
        return PassResult(gm, bool(self.plan.sparse))
