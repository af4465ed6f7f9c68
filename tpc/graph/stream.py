"""Locate the residual stream around an attention site.

A pruning point is a tensor of the residual stream, [B, N, C] or [N, B, C]:

  after="attention" (default)     x ─┬─► norm ─► attn ─► proj ─► … ─┐
                                     └──────────────────────────── add ◄── here: the block's
                                                                          MLP runs on fewer tokens
  after="block"                   the next residual add (after the MLP)

The attention residual add is the first ``add`` downstream of the site whose other operand
does not depend on the attention output (the skip connection).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from tpc.errors import TpcError
from tpc.graph.attention import AttentionSite
from tpc.graph.nodes import aten, batch_size_numeric, describe, is_op, numeric_shape, val


@dataclass
class StreamPoint:
    node: fx.Node
    token_dim: int
    batch_dim: int | None
    tokens: int
    channels: int
    skip: fx.Node | None = None  # the residual input of the attention add (the stream before the block)


def descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _stream_shaped(node: fx.Node, tokens: int, channels: int | None) -> bool:
    shape = numeric_shape(node)
    return len(shape) == 3 and tokens in shape[:2] and (channels is None or shape[-1] == channels)


def _attention_residual(gm: fx.GraphModule, attn_out: fx.Node, tokens: int) -> tuple[fx.Node, fx.Node] | None:
    """(add, skip): the first add below the attention whose other operand, the skip, is independent of it."""
    below = descendants(attn_out)
    for node in gm.graph.nodes:
        if node not in below or not is_op(node, aten.add):
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        a_dep, b_dep = (a is attn_out or a in below), (b is attn_out or b in below)
        if a_dep != b_dep and _stream_shaped(node, tokens, None):
            return node, (b if a_dep else a)
    return None


def _block_residual(gm: fx.GraphModule, attn_add: fx.Node, tokens: int) -> fx.Node | None:
    """The MLP residual: add(s, f(s)) where s is the attention residual or its post-norm."""
    channels = numeric_shape(attn_add)[-1]
    stream = {attn_add} | {u for u in attn_add.users if is_op(u, aten.layer_norm, aten.rms_norm)}
    below = descendants(attn_add)
    for node in gm.graph.nodes:
        if node not in below or not is_op(node, aten.add) or not _stream_shaped(node, tokens, channels):
            continue
        a, b = node.args[:2]
        if (a in stream and b in below) or (b in stream and a in below):
            return node
    return None


def _point(node: fx.Node, tokens: int, batch: int | None) -> StreamPoint:
    shape = numeric_shape(node)
    batch_dim = shape.index(batch) if batch in shape[:2] else None
    token_dims = [d for d in (0, 1) if shape[d] == tokens and d != batch_dim]
    if not token_dims:
        raise TpcError(f"cannot find the token axis of {describe(node)} with shape {list(val(node).shape)}")
    return StreamPoint(node=node, token_dim=token_dims[0], batch_dim=batch_dim, tokens=tokens, channels=shape[-1])


def find_stream_point(gm: fx.GraphModule, site: AttentionSite, after: str = "attention") -> StreamPoint:
    """The residual-stream tensor after ``site``'s attention (or after its whole block)."""
    batch = batch_size_numeric(gm)
    found = _attention_residual(gm, site.output, site.tokens)
    if found is None:
        raise TpcError(
            f"layer {site.layer} ({site.module or 'attention'}): no residual add follows the attention at "
            f"{describe(site.node)}; tpc prunes the residual stream of transformer blocks"
        )
    attn_add, skip = found
    if after == "attention":
        point = _point(attn_add, site.tokens, batch)
        point.skip = skip
        return point
    if after != "block":
        raise TpcError(f"unknown insertion point {after!r}: use 'attention' or 'block'")
    block_add = _block_residual(gm, attn_add, site.tokens)
    if block_add is None:
        raise TpcError(f"layer {site.layer} ({site.module}): no MLP residual add follows the attention residual")
    return _point(block_add, site.tokens, batch)
