"""``SparseDecode``: rewrite a captured decode step so its sparse layers read only selected positions.

Rewrite rules (TidalDecode, arXiv 2410.05076, §3; per KV head for grouped-query attention):

1. At each selection layer s, after its (dense) attention:
   ``scores = tpc::group_attention(q_s, cat(past_k_s, new_k_s), mask)`` [B, Hkv, L + 1] and
   ``index = tpc::top_positions(scores, keep)`` [B, Hkv, K], K = min(keep, L); for a ratio r of
   the cache, ``keep`` is computed in the graph from the symbolic L as ceil(r × L) = (L · n + d - 1) // d
   (r = n / d), so one compiled step serves every cache length.
2. At each sparse layer l reading selection layer s, the SDPA over the whole cache is
   replaced by one over K + 1 positions (the selected ones and the new token)::

       past_k_l ─► gather_positions(index) ─► cat(·, new_k_l) ─┐
       past_v_l ─► gather_positions(index) ─► cat(·, new_v_l) ─┤
       mask ─► transpose ─► gather_positions(index) ─► cat(·, mask[new]) ─► transpose ─┤
       q_l [B, H, 1, d] ─► reshape [B, Hkv, G, d] ───────────────────────────────► SDPA ─► reshape [B, H, 1, d]

   The G query heads of a KV head become G queries of one head, so the keys are never
   repeated over query heads; ``cat(past, new)`` of that layer dies with its old SDPA, so
   nothing reads the full cache there.

With ``ideal=True`` the sparse layers' SDPA reads its own cache as it is, unmasked (no
scoring, no gather): the step of a cache that physically holds only the selected positions
in those layers, the physical limit of the method (benchmarks only; no padding).
"""

from __future__ import annotations

import abc
import logging
import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from tpc.decode import ops  # noqa: F401  (registers the tpc:: decode ops)
from tpc.decode.graph import CacheAttention, cache_attention
from tpc.decode.plan import Plan, ratio_parts, selected_count
from tpc.graph.nodes import val
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role, mark_rewritten
from tpc.passes.infra import Pass, PassResult

logger = logging.getLogger("tpc.passes")
tpc = torch.ops.tpc
aten = torch.ops.aten
_END = 9223372036854775807


class SparseDecode(Pass):
    def __init__(self, plan: Plan, ideal: bool = False):
        self.plan, self.ideal = plan, ideal
        self.name = f"sparse_decode({plan.method}{', ideal' if ideal else ''})"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.plan.sparse:  # every layer dense (no layer after a selection layer): nothing to rewrite
            return PassResult(gm, False)
        sites = {a.layer: a for a in cache_attention(gm)}
        index: dict[int, fx.Node] = {}
        if not self.ideal:
            for layer in self.plan.selection:
                index[layer] = _select(gm, sites[layer], self.plan.keep)
        masks: dict[int, fx.Node] = {}  # per selection layer: the mask at its positions, built once
        for layer in self.plan.sparse:
            source = self.plan.source(layer)
            _sparse_attention(gm, sites[layer], None if self.ideal else index[source], masks, source)
        finish(gm)
        logger.debug("%s: selection layers %s, sparse layers %s", self.name, self.plan.selection, self.plan.sparse)
        return PassResult(gm, True)


def _select(gm: fx.GraphModule, site: CacheAttention, keep: int | float) -> fx.Node:
    b = Builder(gm, site.sdpa)
    scores = b.op(tpc.group_attention.default, site.q, site.keys, site.mask, site.scale, role=Role.SCORING)
    return b.op(tpc.top_positions.default, scores, budget(b, site, keep), role=Role.SELECTION)


def budget(b: Builder, site: CacheAttention, keep: int | float, page: int | None = None):
    """What the selection op of ``site`` keeps (positions, or with ``page`` pages): an int budget as a constant;
    a ratio as integer nodes on the layer's symbolic cache length L, (L · n + d - 1) // d for the ratio n / d
    (then rounded up to pages), as :func:`tpc.decode.plan.selected_count` computes it."""
    if not isinstance(keep, float):
        return selected_count(keep, 0, page)
    n, d = ratio_parts(keep)
    cached = b.op(aten.sym_size.int, site.past_k, 2, role=Role.SELECTION)
    count = b.op(operator.floordiv, b.op(operator.add, b.op(operator.mul, cached, n, role=Role.SELECTION), d - 1,
                                         role=Role.SELECTION), d, role=Role.SELECTION)
    if page is None:
        return count
    return b.op(operator.floordiv, b.op(operator.add, count, page - 1, role=Role.SELECTION), page, role=Role.SELECTION)


def _sparse_attention(gm: fx.GraphModule, site: CacheAttention, index: fx.Node | None, masks: dict,
                      source: int) -> None:
    b = Builder(gm, site.sdpa.prev)
    b.like = site.sdpa
    if index is None:
        attend_grouped(gm, b, site, site.keys, site.values, None)
        return
    keys, values = gathered_cache(b, site, index)
    if source not in masks:
        masks[source] = gathered_mask(b, site, index)
    attend_grouped(gm, b, site, keys, values, masks[source])


def gathered_mask(b: Builder, site: CacheAttention, index: fx.Node) -> fx.Node:
    """The layer's SDPA mask at ``index`` ([B, Hkv, K]), the new token's column appended: [B, Hkv, 1, K + 1]."""
    kv_heads = val(site.past_k).shape[1]
    columns = b.op(aten.transpose.int, site.mask, 2, 3, role=Role.GATHER)  # [B, 1, L + 1, 1]
    chosen = b.op(tpc.gather_positions.default, columns, index, role=Role.GATHER)
    new = b.op(aten.expand.default, b.op(aten.slice.Tensor, columns, 2, -1, _END, role=Role.GATHER),
               [-1, kv_heads, -1, -1], role=Role.GATHER)
    return b.op(aten.transpose.int, b.op(aten.cat.default, [chosen, new], 2, role=Role.GATHER), 2, 3,
                role=Role.GATHER)


def add_step_inputs(gm: fx.GraphModule, inputs: list[tuple[str, object]]) -> list[fx.Node]:
    """New graph inputs after the cache's, one per (name, make) in order, ``make(past_keys)`` giving the fake
    value from a fake [B, Hkv, L, d] cache (run in the graph's fake mode, so its sizes are the step's symbols);
    the step's signature gains the list of them as its fifth argument: (input_ids, position_ids,
    attention_mask, past, side). Quest's page bounds and DHSA's chunk summaries are such inputs."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fake_mode = detect_fake_mode([val(n) for n in placeholders])
    keys = val(placeholders[3])
    last, made = placeholders[-1], []
    for name, make in inputs:
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(name)
        with fake_mode:
            last.meta["val"] = make(keys)
        made.append(last)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        past = len(placeholders) - 3
        spec = pytree.tree_structure(((0, 0, 0, [0] * past, [0] * len(made)), {}))
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, "bounds"], in_spec=spec)
    return made


def gathered_cache(b: Builder, site: CacheAttention, index: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The layer's cached keys and values at ``index`` ([B, Hkv, K]), the new token's appended: [B, Hkv, K + 1, d]."""
    keys = b.op(aten.cat.default, [b.op(tpc.gather_positions.default, site.past_k, index, role=Role.GATHER),
                                   site.new_k], 2, role=Role.GATHER)
    values = b.op(aten.cat.default, [b.op(tpc.gather_positions.default, site.past_v, index, role=Role.GATHER),
                                     site.new_v], 2, role=Role.GATHER)
    return keys, values


def attend_grouped(gm: fx.GraphModule, b: Builder, site: CacheAttention, keys: fx.Node, values: fx.Node,
                   mask: fx.Node | None) -> None:
    """Replace the layer's SDPA by one over ``keys``/``values`` ([B, Hkv, N, d]), the G query heads of a
    KV head folded into G queries of that head (no repeat of the keys over query heads)."""
    q = val(site.q)
    heads, width = q.shape[1], q.shape[3]
    kv_heads = val(site.past_k).shape[1]
    grouped = b.op(aten.reshape.default, site.q, [-1, kv_heads, heads // kv_heads, width], role=Role.GATHER)
    out = b.op(aten.scaled_dot_product_attention.default, grouped, keys, values, mask, role=Role.MODEL)
    out.kwargs = {"scale": site.scale}
    merged = b.op(aten.reshape.default, out, [-1, heads, 1, width], role=Role.GATHER)
    site.sdpa.replace_all_uses_with(merged)
    mark_rewritten(out)


class OwnSelectionDecode(Pass):
    """A rewrite whose every sparse layer selects from its own cache, for its own query (quest, dhsa): the
    step gains the method's side inputs (``side_inputs``), and each sparse layer's SDPA is replaced by one over
    what ``read`` selects; with ``ideal`` each reads its own cache as it is (no scoring, no gather)."""

    def __init__(self, plan: Plan, ideal: bool = False):
        self.plan, self.ideal = plan, ideal

    @abc.abstractmethod
    def side_inputs(self, gm: fx.GraphModule, sites: list[CacheAttention]) -> dict:
        """The method's side inputs of the step (quest's page bounds, dhsa's chunks), per sparse layer."""

    @abc.abstractmethod
    def read(self, b: Builder, site: CacheAttention, inputs) -> tuple[fx.Node, fx.Node, fx.Node]:
        """(keys, values, mask) the layer at ``site`` attends to, from its side ``inputs``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.plan.sparse:  # no sparse layer: the step as captured
            return PassResult(gm, False)
        sites = {a.layer: a for a in cache_attention(gm)}
        inputs = {} if self.ideal else self.side_inputs(gm, [sites[layer] for layer in self.plan.sparse])
        for layer in self.plan.sparse:
            site = sites[layer]
            b = Builder(gm, site.sdpa.prev)
            b.like = site.sdpa
            if self.ideal:
                attend_grouped(gm, b, site, site.keys, site.values, None)
            else:
                attend_grouped(gm, b, site, *self.read(b, site, inputs[layer]))
        finish(gm)
        logger.debug("%s: sparse layers %s", self.name, self.plan.sparse)
        return PassResult(gm, True)
