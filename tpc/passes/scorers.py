"""How each pruning method emits its scoring nodes into the graph.

A scorer gets a ``Builder`` positioned right after the pruning point and returns a [B, N]
score node (higher = keep). The algorithms themselves live in :mod:`tpc.methods` behind
``tpc::`` ops; this module only wires q, k, masks and the stream into those ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode

from tpc.errors import TpcError
from tpc.graph import AttentionSite, StreamPoint
from tpc.graph.nodes import aten, numeric_shape, val

tpc_ops = torch.ops.tpc


class Builder:
    """Inserts nodes one after another, computing their fake values as it goes."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.graph = gm.graph
        self.cursor = anchor
        self.like = anchor
        self.fake_mode = detect_fake_mode([val(anchor)])
        self.inserted: list[fx.Node] = []

    def op(self, target, *args, role: str = "score", value=None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, tuple(args))
        if value is None:
            with self.fake_mode:
                value = target(*fx.node.map_aggregate(args, lambda a: val(a) if isinstance(a, fx.Node) else a))
        node.meta["val"] = value
        node.meta["nn_module_stack"] = self.like.meta.get("nn_module_stack", {})
        node.meta["tpc_inserted"] = role
        self.cursor = node
        self.inserted.append(node)
        return node


@dataclass
class ScoreInputs:
    site: AttentionSite
    point: StreamPoint
    stream: fx.Node  # the stream in [B, N, C] layout
    prefix: int
    seed: int


def query_key(b: Builder, site: AttentionSite) -> tuple[fx.Node, fx.Node]:
    """q and k of a site as [B, H, N, d]."""
    k = site.k if site.k is not None else b.op(aten.transpose.int, site.k_transposed, -2, -1)
    q = site.q
    if len(val(q).shape) == 3:
        q = b.op(aten.view.default, q, [-1, site.heads, *numeric_shape(q)[1:]])
        k = b.op(aten.view.default, k, [-1, site.heads, *numeric_shape(k)[1:]])
    return q, k


def keep_mask(b: Builder, site: AttentionSite) -> fx.Node | None:
    """The site's mask as torch SDPA takes it (bool True = may attend, or additive)."""
    mask = site.mask
    if mask is None:
        return None
    if site.mask_kind == "drop":
        mask = b.op(aten.logical_not.default, mask)
    if len(val(site.q).shape) == 3 and len(val(mask).shape) == 3 and numeric_shape(mask)[0] != 1:
        mask = b.op(aten.view.default, mask, [-1, site.heads, *numeric_shape(mask)[1:]])
    return mask


def cls_attention_scores(b: Builder, s: ScoreInputs) -> fx.Node:
    if s.prefix < 1:
        raise TpcError(
            f"topk-cls ranks tokens by their [CLS] attention, but no [CLS] token was found in this model; "
            "pass prefix=1 (--prefix 1) if token 0 is a [CLS] token, or use another method"
        )
    if s.site.is_causal:
        raise TpcError(f"layer {s.site.layer} uses causal attention: [CLS] attention cannot rank its tokens")
    q, k = query_key(b, s.site)
    return b.op(tpc_ops.cls_attention.default, q, k, s.site.scale, keep_mask(b, s.site))


def random_scores(b: Builder, s: ScoreInputs) -> fx.Node:
    return b.op(tpc_ops.random_scores.default, s.stream, s.seed + s.site.layer)


@dataclass(frozen=True)
class PruneMethod:
    name: str
    paper: str
    summary: str
    score: Callable[[Builder, ScoreInputs], fx.Node]


METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in (
        PruneMethod(
            "topk-cls",
            "EViT (Liang et al., ICLR 2022); VTC-CLS (2024)",
            "keep the tokens [CLS] attends to most (head-mean attention), top-k gather",
            cls_attention_scores,
        ),
        PruneMethod(
            "random",
            "baseline",
            "keep a seeded uniform random subset per example",
            random_scores,
        ),
    )
}


def get_method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise TpcError(f"unknown pruning method {name!r}: choose one of {', '.join(METHODS)} (see `tpc passes`)")
    return METHODS[name]
