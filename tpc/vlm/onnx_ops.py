"""ONNX translations of the ``tpc::`` VLM ops (tpc/vlm/ops.py), standard opset-18 ops only.

Each mirrors the op's reference implementation: positions in prompt order come from a TopK
over float keys (exact below 2^24 tokens) instead of a stable sort; gathers are
GatherElements. ``visual_index`` cannot refuse a prompt with another number of visual tokens
inside ONNX (no op raises): the caller gives every prompt the compiled number, as
``VlmModule.prefill`` checks. The other ``tpc::`` ops a VLM rewrite uses (``select_topk``,
``divprune``, ``kcenter``, ``random_scores``, ``cls_attention``) are in
:mod:`tpc.exports.onnx_ops`.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from tpc.exports.onnx_ops import FLOAT, INT64, TRANSLATIONS, _count, _ints, _is_bool, _logits, _masked
from tpc.vlm import ops  # noqa: F401  (registers the tpc:: VLM ops)


def _positions(x, axis: int = 1):
    """[1, S] int64 0..S-1 for the token axis of ``x``."""
    n = op.Squeeze(op.Shape(x, start=axis, end=axis + 1), _ints(0))
    return op.Unsqueeze(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)), _ints(0))


def _first_true(flags, count):
    """[B, count] int64: the positions where ``flags`` ([B, S] bool) holds, ascending (the first
    ``count`` of them). Key −p for a flagged position, −p − S otherwise; TopK largest, sorted."""
    pos = op.Cast(_positions(flags), to=FLOAT)
    length = op.Cast(op.Shape(flags, start=1, end=2), to=FLOAT)
    key = op.Where(flags, op.Neg(pos), op.Sub(op.Neg(pos), length))
    _, index = op.TopK(key, _count(count), axis=1, largest=1, sorted=1)
    return index


def visual_index(visual, count: int):
    return _first_true(op.Cast(visual, to=9), count)  # 9: BOOL


def keep_visual(visual_pos, chosen, tokens):
    """Every position but the visual ones, then the chosen visual positions back; ascending."""
    length = _ints(tokens) if isinstance(tokens, int) else op.Reshape(_as_int64(tokens), _ints(1))
    keep = op.Expand(op.Constant(value_float=1.0), op.Concat(op.Shape(visual_pos, start=0, end=1), length, axis=0))
    keep = op.ScatterElements(keep, visual_pos, op.Expand(op.Constant(value_float=0.0), op.Shape(visual_pos)), axis=1)
    back = op.GatherElements(visual_pos, chosen, axis=1)
    keep = op.ScatterElements(keep, back, op.Expand(op.Constant(value_float=1.0), op.Shape(chosen)), axis=1)
    visual, kept = _static(visual_pos, 1), _static(chosen, 1)
    count = tokens - visual + kept if isinstance(tokens, int) else op.Add(_as_int64(tokens),
                                                                           op.Constant(value_int=kept - visual))
    return _first_true(op.Cast(keep, to=9), count)


def gather_axis(x, index, dim: int):
    """x's axis ``dim`` reduced to index's rows ([B, K]) per example; a batch-1 x is broadcast."""
    rank = len(x.shape)
    dim = dim % rank
    src = op.Expand(x, op.Concat(op.Shape(index, start=0, end=1), op.Shape(x, start=1), axis=0))
    shape = [op.Shape(index, start=0, end=1)] + [_ints(1)] * (rank - 1)
    shape[dim] = op.Shape(index, start=1, end=2)
    idx = op.Reshape(index, op.Concat(*shape, axis=0))
    size = [op.Shape(src, start=d, end=d + 1) for d in range(rank)]
    size[dim] = op.Shape(index, start=1, end=2)
    return op.GatherElements(src, op.Expand(idx, op.Concat(*size, axis=0)), axis=dim)


def last_token_attention(q, k, scale: float, mask=None, valid=None):
    """Head-mean softmax of each example's last real prompt token (or the last row) over the
    keys up to it, [B, S] float32; only that query row is computed, as in the reference."""
    heads, kv_heads = _static(q, 1), _static(k, 1)
    if kv_heads != heads:  # grouped keys: each key head serves heads // kv_heads query heads
        repeat = heads // kv_heads
        k5 = op.Unsqueeze(k, _ints(2))
        k5 = op.Expand(k5, op.Concat(op.Shape(k, start=0, end=2), _ints(repeat), op.Shape(k, start=2), axis=0))
        k = op.Reshape(k5, op.Concat(op.Shape(k, start=0, end=1), _ints(heads), op.Shape(k, start=2), axis=0))
    length = op.Shape(q, start=2, end=3)
    if valid is None:
        last = op.Expand(op.Sub(length, _ints(1)), op.Shape(q, start=0, end=1))  # [B]
    else:  # the last index holding the largest value (1 at a real token; all 0: the last row)
        last = op.ArgMax(op.Cast(valid, to=INT64), axis=1, keepdims=0, select_last_index=1)
    row = op.Reshape(last, _ints(-1, 1, 1, 1))  # [B, 1, 1, 1]
    width = op.Shape(q, start=3, end=4)
    query = op.GatherElements(q, op.Expand(row, op.Concat(op.Shape(q, start=0, end=2), _ints(1), width, axis=0)),
                              axis=2)
    logits = _logits(query, k, scale)  # [B, H, 1, S]
    if mask is not None:
        full = op.Concat(op.Shape(q, start=0, end=1), op.Shape(mask, start=1, end=2), length, length, axis=0)
        rows = op.Expand(row, op.Concat(op.Shape(q, start=0, end=1), op.Shape(mask, start=1, end=2), _ints(1), length,
                                        axis=0))
        logits = _masked(logits, op.GatherElements(op.Expand(mask, full), rows, axis=2), _is_bool(mask))
    future = op.Greater(_positions(k, 2), op.Unsqueeze(last, _ints(1)))  # [B, S]: keys after the query
    logits = op.Where(op.Unsqueeze(future, _ints(1, 2)), op.Constant(value_float=float("-inf")), logits)
    probs = op.Softmax(logits, axis=-1)
    return op.Squeeze(op.ReduceMean(probs, _ints(1), keepdims=0), _ints(1))


def _as_int64(n):
    return op.Cast(n, to=INT64)


def _static(x, dim: int) -> int:
    size = x.shape[dim]
    if isinstance(size, int) or str(size).isdigit():
        return int(str(size))
    raise ValueError(f"axis {dim} of {x.name} must be static for the ONNX translation")


VLM_TRANSLATIONS = {
    torch.ops.tpc.visual_index.default: visual_index,
    torch.ops.tpc.keep_visual.default: keep_visual,
    torch.ops.tpc.gather_axis.default: gather_axis,
    torch.ops.tpc.last_token_attention.default: last_token_attention,
}
ALL_TRANSLATIONS = {**TRANSLATIONS, **VLM_TRANSLATIONS}
