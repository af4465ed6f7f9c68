"""How each pruning method turns a pruning point into a compaction in the graph.

A method gets a ``Builder`` positioned right after the stream tensor and a ``PruneContext``
(the layer's attention site, the stream in [B, N, C] layout, how many tokens to keep) and
emits ``tpc::`` ops: scores, a selection, and a gather (or a merge). It returns the new
stream and the [B, K] index of the original position each output token stands for, which
``propagate_token_axis`` uses to gather side tensors. The algorithms live in
:mod:`tpc.methods`; this module only wires q, k, masks and the stream into the ops. Each
``build_*`` is a method's implementation at ``Where.ENCODER`` in :mod:`tpc.registry`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph import AttentionSite, StreamPoint
from tpc.graph.nodes import aten, numeric_shape, val
from tpc.methods import tome
from tpc.methods.zero_tprune import auto_iterations, s_stage_drop_count
from tpc.passes.compaction import Builder, Role, merge_sizes
from tpc.registry import METHODS, Where

tpc_ops = torch.ops.tpc


@dataclass
class PruneContext:
    site: AttentionSite
    point: StreamPoint
    stream: fx.Node  # the stream in [B, N, C] layout
    tokens: int
    kept: int | fx.Node  # non-prefix tokens to keep; a SymInt node when the length is symbolic
    prefix: int
    layer: int
    depth: int
    seed: int
    options: dict
    sizes: fx.Node | None = None  # [B, N]: how many original tokens each stream token stands for, after a merge


@dataclass
class MethodOutput:
    out: fx.Node  # the new stream, [B, tokens, C]
    index: fx.Node  # [B, tokens]: the original position each output token stands for
    tokens: int
    merge: fx.Node | None = None  # a tpc.merge_tokens node: its output 1 holds the token sizes


def stream_sizes(gm: fx.GraphModule, record) -> fx.Node | None:
    """[B, tokens_out]: the token sizes after compaction ``record`` (None when no merge is upstream).

    A merge makes them; a later gather-based compaction carries them by gathering the sizes of
    its input with its kept indices, so proportional attention and later merges stay exact when
    pruning follows merging. Made on demand and reused when already there.
    """
    if record.merge is not None:
        return merge_sizes(record.merge)
    if record.carries is None:
        return None
    source = stream_sizes(gm, record.carries)
    for user in record.index.users:
        if user.target is tpc_ops.gather_tokens.default and user.args[0] is source:
            return user
    return Builder(gm, record.index).op(tpc_ops.gather_tokens.default, source, record.index, role=Role.GATHER)


def query_key(b: Builder, site: AttentionSite) -> tuple[fx.Node, fx.Node]:
    """q and k of a site as [B, H, N, d]."""
    k = site.k if site.k is not None else b.op(aten.transpose.int, site.k_transposed, -2, -1, role=Role.SCORING)
    q = site.q
    if len(val(q).shape) == 3:
        q = b.op(aten.view.default, q, [-1, site.heads, *numeric_shape(q)[1:]], role=Role.SCORING)
        k = b.op(aten.view.default, k, [-1, site.heads, *numeric_shape(k)[1:]], role=Role.SCORING)
    return q, k


def keep_mask(b: Builder, site: AttentionSite) -> fx.Node | None:
    """The site's mask as torch SDPA takes it (bool True = may attend, or additive)."""
    mask = site.mask
    if mask is None:
        return None
    if site.mask_kind == "drop":
        mask = b.op(aten.logical_not.default, mask, role=Role.SCORING)
    if len(val(site.q).shape) == 3 and len(val(mask).shape) == 3 and numeric_shape(mask)[0] != 1:
        mask = b.op(aten.view.default, mask, [-1, site.heads, *numeric_shape(mask)[1:]], role=Role.SCORING)
    return mask


def mean_keys(b: Builder, site: AttentionSite) -> fx.Node:
    """Head-averaged keys [B, N, d] (ToMe's matching metric)."""
    _q, k = query_key(b, site)
    return b.op(aten.mean.dim, k, [1], role=Role.SCORING)


def dynamic_length(ctx: PruneContext) -> bool:
    return isinstance(ctx.kept, fx.Node)


def _fixed_length_only(ctx: PruneContext, what: str) -> None:
    if dynamic_length(ctx):
        raise TpcError(f"{what} needs a fixed sequence length, but layer {ctx.layer} sees a dynamic one: "
                       "fix the length with --seq-len N (seq_len=N)")


def gather(b: Builder, ctx: PruneContext, index: fx.Node) -> MethodOutput:
    out = b.op(tpc_ops.gather_tokens.default, ctx.stream, index, role=Role.GATHER, value=val(ctx.stream))
    tokens = numeric_shape(index)[1] if dynamic_length(ctx) else ctx.prefix + ctx.kept
    return MethodOutput(out, index, tokens)


def select(b: Builder, ctx: PruneContext, scores: fx.Node) -> fx.Node:
    return b.op(tpc_ops.select_topk.default, scores, ctx.kept, ctx.prefix, role=Role.SELECTION)


def _needs_cls(ctx: PruneContext, method: str) -> None:
    if ctx.prefix < 1:
        raise TpcError(
            f"{method} ranks tokens by their [CLS] attention, but no [CLS] token was found in this model; "
            "pass prefix=1 (--prefix 1) if token 0 is a [CLS] token, or use another method"
        )
    if ctx.site.is_causal:
        raise TpcError(f"layer {ctx.layer} uses causal attention: [CLS] attention cannot rank its tokens")


def build_topk_cls(b: Builder, ctx: PruneContext) -> MethodOutput:
    _needs_cls(ctx, "topk-cls")
    if ctx.options["fuse"]:
        _fixed_length_only(ctx, "topk-cls with fuse=True")
    if ctx.site.heads_mixed:  # talking heads: the softmax in the graph is the attention, q·kᵀ alone is not
        scores = b.op(aten.mean.dim, b.op(aten.select.int, ctx.site.probs, -2, 0, role=Role.SCORING), [1],
                      role=Role.SCORING)
    else:
        q, k = query_key(b, ctx.site)
        scores = b.op(tpc_ops.cls_attention.default, q, k, ctx.site.scale, keep_mask(b, ctx.site), role=Role.SCORING)
    index = select(b, ctx, scores)
    if not ctx.options["fuse"] or ctx.prefix + ctx.kept == ctx.tokens:  # nothing dropped, nothing to fuse
        return gather(b, ctx, index)
    out = b.op(tpc_ops.fuse_tokens.default, ctx.stream, scores, index, role=Role.GATHER, value=val(ctx.stream))
    first = b.op(aten.slice.Tensor, index, 1, 0, 1, role=Role.SELECTION)
    rep = b.op(aten.cat.default, [index, first], 1, role=Role.SELECTION)  # the fused token stands at [CLS]'s place
    return MethodOutput(out, rep, ctx.prefix + ctx.kept + 1)


def key_valid(b: Builder, site: AttentionSite) -> fx.Node:
    """[B, N] or [N] bool: the keys the site's mask lets some query attend to (padding is False).

    A key no query may see is padding. Reading one query's row would not do: under a causal
    mask query 0 sees key 0 only, which would rank every later real token as padding. The mask
    is right-aligned with the logits [B, H, N, N]; reduced over queries it is [B, H, N], so the
    head dim (second from the right) is reduced too and a batch dim, if present, kept.
    """
    mask = keep_mask(b, site)
    if val(mask).dtype != torch.bool:
        mask = b.op(aten.gt.Scalar, mask, -1e4, role=Role.SCORING)
    row = b.op(aten.any.dim, mask, -2, role=Role.SCORING)
    rank = len(val(row).shape)
    if rank > 3:
        raise TpcError(f"layer {site.layer}: an attention mask of rank {rank + 1} is not one tpc can read")
    if rank >= 2:
        row = b.op(aten.all.dim, row, rank - 2, role=Role.SCORING)
    return row


def _valid(b: Builder, ctx: PruneContext) -> fx.Node | None:
    return None if ctx.site.mask is None else key_valid(b, ctx.site)


def build_random(b: Builder, ctx: PruneContext) -> MethodOutput:
    scores = b.op(tpc_ops.random_scores.default, ctx.stream, ctx.seed + ctx.layer, role=Role.SCORING)
    valid = _valid(b, ctx)
    if valid is not None:  # padding ranks below every real token
        scores = b.op(aten.where.ScalarOther, valid, scores, -1.0, role=Role.SCORING)
    return gather(b, ctx, select(b, ctx, scores))


def build_topk_mass(b: Builder, ctx: PruneContext) -> MethodOutput:
    """Score = Σ_i A[i, j] averaged over heads: the attention token j receives (PoWER-BERT's significance).

    Explicit attention gives the probabilities; otherwise they are recomputed, and on a plain SDPA
    layer ``fuse_attention_scores`` later takes them from the layer's own attention instead.
    """
    site = ctx.site
    if site.probs is not None and len(val(site.probs).shape) == 4:
        probs = site.probs
    else:
        q, k = query_key(b, site)
        probs = b.op(tpc_ops.attention_probs.default, q, k, site.scale, keep_mask(b, site), role=Role.SCORING)
    mass = b.op(aten.sum.dim_IntList, probs, [-2], role=Role.SCORING)
    scores = b.op(aten.mean.dim, mass, [1], role=Role.SCORING)  # [B, N]: attention received, averaged over heads
    return gather(b, ctx, select(b, ctx, scores))


def build_zero_tprune(b: Builder, ctx: PruneContext) -> MethodOutput:
    o = ctx.options
    site = ctx.site
    similarity = o["similarity"]
    if similarity == "auto":  # the paper's 0.5 where the S-stage can run: at a fixed length
        similarity = 0.0 if dynamic_length(ctx) else 0.5
    if float(similarity) > 0:
        _fixed_length_only(ctx, "zero-tprune's similarity stage (option similarity > 0; similarity=0 works at any length)")
    if site.probs is not None and len(val(site.probs).shape) == 4:
        probs = site.probs
    else:
        q, k = query_key(b, site)
        probs = b.op(tpc_ops.attention_probs.default, q, k, site.scale, keep_mask(b, site), role=Role.SCORING)
    iterations = auto_iterations(ctx.layer, ctx.depth) if o["iterations"] == "auto" else int(o["iterations"])
    importance = b.op(tpc_ops.weighted_pagerank.default, probs, iterations, float(o["v_min"]), float(o["v_max"]), None, role=Role.SCORING)
    drop = 0 if dynamic_length(ctx) else s_stage_drop_count(ctx.tokens, ctx.prefix, ctx.kept, float(similarity))
    if drop > 0:
        keep = b.op(tpc_ops.similarity_keep.default, importance, mean_keys(b, site), drop, ctx.prefix, str(o["partition"]), role=Role.SCORING)
        importance = b.op(tpc_ops.weighted_pagerank.default, probs, iterations, float(o["v_min"]), float(o["v_max"]), keep, role=Role.SCORING)
    return gather(b, ctx, select(b, ctx, importance))


def _diverse(op, b: Builder, ctx: PruneContext) -> MethodOutput:
    valid = _valid(b, ctx)
    padding = () if valid is None else (valid,)  # padding is picked only once the real tokens run out
    return gather(b, ctx, b.op(op, ctx.stream, ctx.kept, ctx.prefix, *padding, role=Role.SELECTION))


def build_kcenter(b: Builder, ctx: PruneContext) -> MethodOutput:
    return _diverse(tpc_ops.kcenter.default, b, ctx)


def build_divprune(b: Builder, ctx: PruneContext) -> MethodOutput:
    return _diverse(tpc_ops.divprune.default, b, ctx)


def build_tome(b: Builder, ctx: PruneContext) -> MethodOutput:
    _fixed_length_only(ctx, "tome (its merge count)")
    r = ctx.tokens - ctx.prefix - ctx.kept
    limit = tome.max_merges(ctx.tokens, ctx.prefix)
    if r > limit:
        raise TpcError(
            f"tome can merge at most {limit} of the {ctx.tokens} tokens at layer {ctx.layer} (ToMe's bound, "
            f"(tokens - prefix) // 2: bipartite matching pairs every other token); keep at least "
            f"{ctx.tokens - ctx.prefix - limit} tokens there, or give r, which tome clamps to that bound as ToMe does"
        )
    if ctx.site.mask is not None:
        masked = [m.name for m in METHODS.values() if m.applies(Where.ENCODER) and m.takes_mask]
        raise TpcError(f"tome does not take attention masks yet (layer {ctx.layer}): padding could be merged into "
                       f"real tokens; use {', '.join(masked[:-1])} or {masked[-1]}")
    match = b.op(tpc_ops.bipartite_match.default, mean_keys(b, ctx.site), r, ctx.prefix, role=Role.SELECTION)
    index = b.op(operator.getitem, match, 0, role=Role.SELECTION)
    assign = b.op(operator.getitem, match, 1, role=Role.SELECTION)
    sizes = ctx.sizes
    if sizes is None:
        sizes = b.op(aten.ones_like.default, b.op(aten.select.int, ctx.stream, -1, 0, role=Role.GATHER), role=Role.GATHER)
    count = ctx.tokens - r
    merge = b.op(tpc_ops.merge_tokens.default, ctx.stream, sizes, assign, count, True, role=Role.GATHER)
    out = b.op(operator.getitem, merge, 0, role=Role.GATHER, value=val(ctx.stream))
    return MethodOutput(out, index, count, merge)
