"""Find the attention sites of an exported graph.

Two forms are recognized, in topological order (the order gives the layer index):

  SDPA:      out = aten.scaled_dot_product_attention(q, k, v, attn_mask, ..., scale)

  explicit:  q ─► [mul/div by s] ─┐
             k ─► transpose(-2,-1) ┴► matmul ─► [mul/div by s] ─► [add mask | masked_fill]
                 ─► [mix heads] ─► softmax(-1) ─► [mix heads] ─► [dropout] ─► matmul(·, v) ─► out

  where "mix heads" is talking-heads attention (CaiT): permute the head dim last, a linear
  layer across heads, permute back. It leaves both token axes alone, so the site is still one
  self-attention; its softmax is what scorers read (``heads_mixed``: q·kᵀ alone is not it).
  Einsum attention reaches this form through ``tpc.graph.einsum`` at capture.

For each site the analysis records what a scorer needs to recompute the logits
``(q @ kᵀ) · scale + mask`` and, for explicit sites, the probabilities already in the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tpc.graph.nodes import (
    aten, batch_size_numeric, is_op, is_pass_through, module_path, numeric_shape, scalar_value, val,
)


@dataclass
class AttentionSite:
    """One attention computation of the graph.

    ``mask_kind`` says how ``mask`` enters the logits: "additive" (added), "keep" (bool,
    True may attend) or "drop" (bool, True is filled with -inf).
    """

    layer: int
    node: fx.Node
    kind: str
    q: fx.Node
    k: fx.Node | None
    k_transposed: fx.Node
    v: fx.Node
    scale: float
    mask: fx.Node | None
    mask_kind: str | None
    probs: fx.Node | None
    output: fx.Node
    heads: int
    tokens: int
    key_tokens: int
    head_dim: int
    module: str
    is_causal: bool
    windows: int = 1  # >1: windowed attention (Swin), the batch dim carries windows of tokens
    heads_mixed: bool = False  # talking heads: logits mixed across heads before the softmax

    @property
    def self_attention(self) -> bool:
        return self.tokens == self.key_tokens


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _heads(q: fx.Node, batch: int | None) -> int:
    shape = numeric_shape(q)
    if len(shape) >= 4:
        return shape[-3]
    lead = shape[0]
    if batch and lead % batch == 0:
        return lead // batch
    return 1


def _sdpa_site(node: fx.Node, batch: int | None) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    is_causal = bool(_arg(node, 5, "is_causal", False))
    head_dim = numeric_shape(q)[-1]
    scale = node.kwargs.get("scale")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    mask_kind = None
    if mask is not None:
        mask_kind = "keep" if val(mask).dtype == torch.bool else "additive"
    return AttentionSite(
        layer=-1, node=node, kind="sdpa", q=q, k=k, k_transposed=None, v=v, scale=scale, mask=mask,
        mask_kind=mask_kind, probs=None, output=node, heads=_heads(q, batch), tokens=numeric_shape(q)[-2],
        key_tokens=numeric_shape(k)[-2], head_dim=head_dim, module=module_path(node), is_causal=is_causal,
    )


def _strip_scale(node, scale: float):
    """Walk back through scalar mul/div and dtype casts; return (node, accumulated scale)."""
    while True:
        if is_pass_through(node):
            node = node.args[0]
        elif is_op(node, aten.mul) and scalar_value(node.args[1]) is not None:
            scale *= scalar_value(node.args[1])
            node = node.args[0]
        elif is_op(node, aten.mul) and scalar_value(node.args[0]) is not None:
            scale *= scalar_value(node.args[0])
            node = node.args[1]
        elif is_op(node, aten.div) and scalar_value(node.args[1]) is not None:
            scale /= scalar_value(node.args[1])
            node = node.args[0]
        else:
            return node, scale


def _is_key_transpose(node) -> bool:
    if is_op(node, aten.transpose):
        rank = len(val(node).shape)
        dims = sorted(d % rank for d in node.args[1:3])
        return dims == [rank - 2, rank - 1]
    if is_op(node, aten.permute):
        perm = list(node.args[1])
        rank = len(perm)
        return perm[:-2] == list(range(rank - 2)) and [p % rank for p in perm[-2:]] == [rank - 1, rank - 2]
    return False


def _head_mix_input(node) -> fx.Node | None:
    """``permute(linear(permute(x, p), W[H, H]), p⁻¹)`` with ``p`` moving dim 1 (heads) last: x, else None."""
    if not is_op(node, aten.permute) or not is_op(node.args[0], aten.linear):
        return None
    linear = node.args[0]
    inner = linear.args[0]
    if not is_op(inner, aten.permute) or len(inner.users) != 1 or len(linear.users) != 1:
        return None
    p, q = list(inner.args[1]), list(node.args[1])
    rank = len(p)
    if rank != 4 or p != [0, 2, 3, 1] or q != [0, 3, 1, 2]:
        return None
    heads = numeric_shape(inner.args[0])[1]
    if numeric_shape(linear.args[1]) != (heads, heads):
        return None
    return inner.args[0]


def _explicit_site(softmax: fx.Node, batch: int | None) -> AttentionSite | None:
    rank = len(val(softmax).shape)
    if rank < 3 or softmax.args[1] % rank != rank - 1:
        return None
    logits, scale = _strip_scale(softmax.args[0], 1.0)
    mixed = _head_mix_input(logits)
    if mixed is not None:
        logits, scale = _strip_scale(mixed, scale)
    mask = mask_kind = None
    if is_op(logits, aten.add) and all(isinstance(a, fx.Node) for a in logits.args[:2]):
        left, lscale = _strip_scale(logits.args[0], scale)
        right, rscale = _strip_scale(logits.args[1], scale)
        if is_op(left, aten.matmul, aten.bmm):
            logits, scale, mask = left, lscale, logits.args[1]
        elif is_op(right, aten.matmul, aten.bmm):
            logits, scale, mask = right, rscale, logits.args[0]
        else:
            return None
        mask_kind = "keep" if val(mask).dtype == torch.bool else "additive"
    elif is_op(logits, aten.masked_fill) and isinstance(logits.args[1], fx.Node):
        fill = scalar_value(logits.args[2])
        if fill is None or fill > -1e4:
            return None
        mask, mask_kind = logits.args[1], "drop"
        logits, scale = _strip_scale(logits.args[0], scale)
    if not is_op(logits, aten.matmul, aten.bmm):
        return None
    q, scale = _strip_scale(logits.args[0], scale)
    k_transposed = logits.args[1]
    k = k_transposed.args[0] if _is_key_transpose(k_transposed) else None

    probs_use = softmax
    while True:
        users = [u for u in _model_users(probs_use) if is_pass_through(u)]
        if len(users) == 1 and len(_model_users(probs_use)) == 1:
            probs_use = users[0]
            continue
        mix = _head_mix_output(probs_use)
        if mix is not None:
            probs_use = mix
            continue
        break
    outputs = [u for u in probs_use.users if is_op(u, aten.matmul, aten.bmm) and u.args[0] is probs_use]
    if len(outputs) != 1:
        return None
    output = outputs[0]
    qs = numeric_shape(q)
    return AttentionSite(
        layer=-1, node=softmax, kind="explicit", q=q, k=k, k_transposed=k_transposed, v=output.args[1],
        scale=scale, mask=mask, mask_kind=mask_kind, probs=softmax, output=output, heads=_heads(q, batch),
        tokens=qs[-2], key_tokens=numeric_shape(k_transposed)[-1], head_dim=qs[-1],
        module=module_path(softmax), is_causal=False, heads_mixed=mixed is not None,
    )


def _model_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that the model has, not the scorers tpc inserted to read it."""
    return [u for u in node.users if u.meta.get("tpc_role") is None]


def _head_mix_output(node: fx.Node) -> fx.Node | None:
    """The head mix applied to ``node`` (its only use), or None."""
    if len(_model_users(node)) != 1:
        return None
    permute = _model_users(node)[0]
    if not is_op(permute, aten.permute) or len(permute.users) != 1:
        return None
    linear = next(iter(permute.users))
    if not is_op(linear, aten.linear) or linear.args[0] is not permute or len(linear.users) != 1:
        return None
    out = next(iter(linear.users))
    return out if _head_mix_input(out) is node else None


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """All attention sites, numbered 0.. in graph order."""
    batch = batch_size_numeric(gm)
    sites = []
    for node in gm.graph.nodes:
        site = None
        if is_op(node, aten.scaled_dot_product_attention):
            site = _sdpa_site(node, batch)
        elif is_op(node, aten.softmax, aten._softmax):
            site = _explicit_site(node, batch)
        if site is not None:
            site.layer = len(sites)
            lead = numeric_shape(site.q)[0]
            if batch and len(val(site.q).shape) == 4 and lead != batch and lead % batch == 0:
                site.windows = lead // batch
            sites.append(site)
    return sites


def layer_runs(layers: list[int]) -> str:
    """``0-2, 4-5``: layer numbers as runs of consecutive layers."""
    runs = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
