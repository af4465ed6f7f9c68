"""``QuestDecode``: rewrite a captured decode step so each quest layer reads only the pages its query selects.

Quest (Tang et al., ICML 2024, arXiv 2406.10774, §3, Alg. 1), per quest layer l (the plan's
selection layers; the others attend densely), the step takes one more input, the layer's page
bounds (min and max of each page's keys, kept by the caller as the cache grows:
``tpc/decode/pages.py``), and its SDPA over the whole cache is replaced by::

    bounds_l [B, Hkv, 2, P, d] (a graph input, P = ceil(L / page))
    q_l, bounds_l, mask ─► tpc::page_scores ─► [B, Hkv, P] ─► tpc::top_pages(·, ceil(keep / page))
        (a ratio r of the cache: ceil(ceil(r × L) / page) pages, computed in the graph from the symbolic L)
        ─► pages [B, Hkv, K] ─► tpc::page_positions ─► index [B, Hkv, K · page]
    past_k_l ─► gather_positions(index) ─► cat(·, new_k_l) ─┐
    past_v_l ─► gather_positions(index) ─► cat(·, new_v_l) ─┤
    mask ─► tpc::page_mask(·, pages) ──────────────────────────┤  (padding and positions past the cache hidden)
    q_l [B, H, 1, d] ─► reshape [B, Hkv, G, d] ─────────────► SDPA ─► reshape [B, H, 1, d]

The page score is summed over the G query heads of a KV head (one set of pages per KV head,
as ``tidal`` ranks per KV group), so a KV head's gathered cache serves its G query heads.
The step's inputs become (input_ids, position_ids, attention_mask, past, bounds), ``bounds``
the list of the quest layers' bounds in layer order; nothing in the step reads a quest layer's
whole cache.
"""

from __future__ import annotations

import torch
from torch import fx

from tpc.decode import page_ops  # noqa: F401  (registers the tpc:: page ops)
from tpc.decode.graph import CacheAttention
from tpc.decode.plan import Plan, describe_budget
from tpc.decode.rewrite import OwnSelectionDecode, add_step_inputs, budget, gathered_cache
from tpc.passes.compaction import Builder, Role

tpc = torch.ops.tpc


class QuestDecode(OwnSelectionDecode):
    def __init__(self, plan: Plan, ideal: bool = False):
        super().__init__(plan, ideal)
        budget = f"{plan.pages} pages" if plan.pages is not None else describe_budget(plan.keep)
        self.name = f"quest_decode(page {plan.page}, {budget}{', ideal' if ideal else ''})"

    def side_inputs(self, gm: fx.GraphModule, sites: list[CacheAttention]) -> dict:
        return _bounds_inputs(gm, sites, self.plan.page)

    def read(self, b: Builder, site: CacheAttention, bounds: fx.Node) -> tuple:
        page = self.plan.page
        scores = b.op(tpc.page_scores.default, site.q, bounds, site.mask, page, role=Role.SCORING)
        pages = b.op(tpc.top_pages.default, scores, budget(b, site, self.plan.keep, page), role=Role.SELECTION)
        index = b.op(tpc.page_positions.default, pages, site.mask, page, role=Role.SELECTION)
        keys, values = gathered_cache(b, site, index)
        return keys, values, b.op(tpc.page_mask.default, site.mask, pages, page, role=Role.GATHER)


def _bounds_inputs(gm: fx.GraphModule, sites: list[CacheAttention], page: int) -> dict[int, fx.Node]:
    """One new graph input per quest layer, its page bounds [B, Hkv, 2, ceil(L / page), d], after the
    cache's inputs; the step's signature gains the list of them as its fifth argument."""
    def bounds(keys):
        return torch.empty(keys.shape[0], keys.shape[1], 2, (keys.shape[2] + page - 1) // page, keys.shape[3],
                           dtype=keys.dtype)

    made = add_step_inputs(gm, [(f"page_bounds_{site.layer}", bounds) for site in sites])
    return {site.layer: node for site, node in zip(sites, made)}
