"""The ``tpc::`` ops of visual-token pruning in a language model's prompt.

Shapes: B batch, S prompt tokens entering a compaction, V visual tokens among them, K visual
tokens kept, H heads, d head width. A compaction keeps every text token and K visual tokens
per example, in their original order, so S' = S - V + K for every example of a batch.
"""

from __future__ import annotations

import torch

from tpc.errors import TpcError
from tpc.flops import TPC_OP_MACS, example_size
from tpc.graph.nodes import val
from tpc.methods.evit import masked_logits

_LIB = "tpc"


@torch.library.custom_op(f"{_LIB}::visual_index", mutates_args=())
def visual_index(visual: torch.Tensor, count: int) -> torch.Tensor:
    """[B, V] int64 positions of the visual tokens (``visual``: [B, S] bool), in prompt order.

    Every example must hold exactly ``count`` visual tokens (the number the graph was
    compiled for): a different number is refused, never truncated.
    """
    found = visual.sum(1)
    if bool((found != count).any()):
        raise TpcError(f"an example holds {found.tolist()} image tokens; this module was compiled for {count} per "
                       "example (one per visual token of its images): compile again for that many images")
    order = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices
    return order[:, :count].contiguous()  # contiguous, as the fake says


@visual_index.register_fake
def _(visual, count):
    return visual.new_empty((visual.shape[0], count), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::last_token_attention", mutates_args=())
def last_token_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] head-mean attention of each example's last prompt token over every key (FastV's score).

    q: [B, H, S, d], k: [B, H or H_kv, S, d] (grouped keys are repeated), mask: SDPA-style,
    [B or 1, 1 or H, S, S] (bool: may attend; float: added). ``valid`` ([B, S], the prompt's
    attention mask at these tokens) makes the query each example's last real token, so a
    right-padded example is scored by its prompt, not by padding; without it the query is
    the last row. Keys after the query are masked (causal). Only the query's row is computed.
    """
    b, _, s, _ = q.shape
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if valid is None:
        last = torch.full((b,), s - 1, dtype=torch.long, device=q.device)
    else:
        last = s - 1 - valid.bool().flip(1).to(torch.int8).argmax(1)
    query = q.float().gather(2, last.view(b, 1, 1, 1).expand(b, q.shape[1], 1, q.shape[-1]))
    logits = torch.matmul(query, k.float().transpose(-1, -2)) * scale  # [B, H, 1, S]
    future = torch.arange(s, device=q.device)[None, :] > last[:, None]  # [B, S]
    if mask is not None:
        mask = mask.expand(b, mask.shape[1], s, s).gather(2, last.view(b, 1, 1, 1).expand(b, mask.shape[1], 1, s))
        logits = masked_logits(logits, mask)
    probs = torch.softmax(logits.masked_fill(future[:, None, None, :], float("-inf")), dim=-1)
    return probs.mean(1)[:, 0]


@last_token_attention.register_fake
def _(q, k, scale, mask=None, valid=None):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


def last_token_attention_macs(node, sizes: dict | None = None) -> int:
    """One query row per example and head against every key: B·H·S·d multiply-adds."""
    b, h, _, d = (example_size(s, sizes or {}) for s in val(node.args[0]).shape)
    return b * h * example_size(val(node.args[1]).shape[2], sizes or {}) * d


TPC_OP_MACS[torch.ops.tpc.last_token_attention] = last_token_attention_macs


@torch.library.custom_op(f"{_LIB}::keep_visual", mutates_args=())
def keep_visual(visual_pos: torch.Tensor, chosen: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, S - V + K] int64 positions kept: every non-visual token and the visual tokens
    ``visual_pos[b, chosen[b]]`` (``visual_pos``: [B, V], ``chosen``: [B, K] indices into it),
    sorted ascending so kept tokens keep their order. ``tokens`` is S."""
    b = visual_pos.shape[0]
    keep = torch.ones(b, tokens, dtype=torch.bool, device=visual_pos.device)
    keep.scatter_(1, visual_pos, False)
    keep.scatter_(1, torch.gather(visual_pos, 1, chosen), True)
    kept = tokens - visual_pos.shape[1] + chosen.shape[1]
    return torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :kept].contiguous()  # as the fake


@keep_visual.register_fake
def _(visual_pos, chosen, tokens):
    return visual_pos.new_empty((visual_pos.shape[0], tokens - visual_pos.shape[1] + chosen.shape[1]))


@torch.library.custom_op(f"{_LIB}::gather_axis", mutates_args=())
def gather_axis(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x with axis ``dim`` (a token axis) reduced to the rows ``index`` ([B, K]) of each example.

    x's batch may be 1 (a side tensor shared by every example, such as rotary cos/sin): it is
    broadcast to index's batch first.
    """
    batch, kept = index.shape
    src = x.expand(batch, *x.shape[1:])
    shape = [1] * src.dim()
    shape[0], shape[dim] = batch, kept
    size = list(src.shape)
    size[dim] = kept
    return torch.gather(src, dim, index.reshape(shape).expand(size))


@gather_axis.register_fake
def _(x, index, dim):
    size = list(x.shape)
    size[0], size[dim] = index.shape[0], index.shape[1]
    return x.new_empty(size)


VLM_OPS = {
    "visual_index": torch.ops.tpc.visual_index.default,
    "last_token_attention": torch.ops.tpc.last_token_attention.default,
    "keep_visual": torch.ops.tpc.keep_visual.default,
    "gather_axis": torch.ops.tpc.gather_axis.default,
}
