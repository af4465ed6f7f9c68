"""ONNX translations of the ``tpc::`` decode-step ops (tidal: tpc/decode/ops.py; quest: page_ops.py).

Standard opset-18 ops only, each mirroring its reference implementation; the cache length L,
the batch and quest's page count stay symbolic. Selection is ONNX TopK, whose ties go to the
lower index (the ONNX spec's tie rule, which ONNX Runtime follows), as the reference's stable
descending sort; its K is min(budget, available) computed at run time (TopK refuses a K over
the axis), the budget a constant or, for a ratio of the cache, the graph's own integer. The
selected positions are then put in cache order by a second TopK over them as float keys (exact
below 2^24, and the step takes at most 2^20 cached positions). ``gather_positions`` is a
GatherElements over the cache's position axis, so it reads only the selected rows.
"""

from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from tpc.decode import ops, page_ops  # noqa: F401  (registers the tpc:: decode ops)
from tpc.exports.onnx_ops import FLOAT, INT64, TRANSLATIONS, _count, _ints, _is_bool, _masked, _static

INT64_MAX = 2**63 - 1
_TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                 ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}


def _grouped(q, kv_heads: int):
    """[B, H, 1, d] -> [B, Hkv, G, d] float32: the G query heads of each KV head as its G queries."""
    heads, width = _static(q, 1), _static(q, 3)
    return op.Reshape(op.Cast(q, to=FLOAT), _ints(0, kv_heads, heads // kv_heads, width))


def _top_ascending(scores, count):
    """[B, Hkv, min(count, N)] int64: the best-scored of the last axis's N entries (ties: the lower
    index), then in ascending order."""
    k = op.Min(_count(count), op.Shape(scores, start=2, end=3))
    _, best = op.TopK(scores, k, axis=-1, largest=1, sorted=1)
    ordered, _ = op.TopK(op.Cast(best, to=FLOAT), k, axis=-1, largest=0, sorted=1)
    return op.Cast(ordered, to=INT64)


def group_attention(q, k, mask, scale: float):
    kt = op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 1, 3, 2])
    logits = op.Mul(op.MatMul(_grouped(q, _static(k, 1)), kt), op.Constant(value_float=scale))  # [B, Hkv, G, L + 1]
    probs = op.Softmax(_masked(logits, mask, _is_bool(mask)), axis=-1)
    return op.ReduceSum(probs, _ints(2), keepdims=0)


def top_positions(scores, count):
    past = op.Slice(scores, _ints(0), _ints(-1), _ints(2))  # the new token is not chosen among
    return _top_ascending(past, count)


def gather_positions(cache, index):
    if _static(cache, 1) != _static(index, 1):  # a one-head cache (the mask) is read per KV head
        cache = op.Expand(cache, op.Concat(op.Shape(index, start=0, end=2), op.Shape(cache, start=2), axis=0))
    rows = op.Expand(op.Unsqueeze(index, _ints(-1)), op.Concat(op.Shape(index), op.Shape(cache, start=3), axis=0))
    return op.GatherElements(cache, rows, axis=2)


def _row(mask):
    """The mask's [B, L + 1] row (``mask``: [B, 1, 1, L + 1])."""
    return op.Squeeze(mask, _ints(1, 2))


def _valid(mask):
    """[B, L + 1] bool: the positions each example may attend to (a float mask: above its dtype's minimum)."""
    row = _row(mask)
    if _is_bool(mask):
        return row
    lowest = float(torch.finfo(_TORCH_DTYPES[mask.dtype]).min)
    return op.Greater(op.Cast(row, to=FLOAT), op.Constant(value_float=lowest))


def _cached(mask):
    """[1] int64: L, the cached positions (the mask's last axis less the new token)."""
    return op.Sub(op.Shape(mask, start=3, end=4), _ints(1))


def _start(mask, page: int):
    """[B, 1] int64: c_b, each example's count of masked cached positions modulo ``page``."""
    past = op.Slice(_valid(mask), _ints(0), _ints(-1), _ints(1))
    masked = op.ReduceSum(op.Cast(op.Not(past), to=INT64), _ints(-1), keepdims=1)
    return op.Mod(masked, op.Constant(value_int=page))


def _page_valid(mask, page: int):
    """[B, P] bool: pages holding a cached position the example may attend to (``page_ops.page_valid``)."""
    length = _cached(mask)
    pages = op.Div(op.Add(length, _ints(page - 1)), _ints(page))
    slots = op.Add(_start(mask, page), op.Unsqueeze(op.Range(op.Constant(value_int=0),
                                                             op.Squeeze(op.Mul(pages, _ints(page)), _ints(0)),
                                                             op.Constant(value_int=1)), _ints(0)))
    positions = op.Min(slots, op.Sub(length, _ints(1)))
    used = op.And(op.Less(slots, length), op.GatherElements(_valid(mask), positions, axis=1))
    per_page = op.Reshape(op.Cast(used, to=FLOAT), _ints(0, -1, page))
    return op.Greater(op.ReduceMax(per_page, _ints(-1), keepdims=0), op.Constant(value_float=0.0))


def page_scores(q, bounds, mask, page: int):
    grouped = _grouped(q, _static(bounds, 1))
    bounds = op.Cast(bounds, to=FLOAT)
    low = op.Squeeze(op.Slice(bounds, _ints(0), _ints(1), _ints(2)), _ints(2))  # [B, Hkv, P, d]
    high = op.Squeeze(op.Slice(bounds, _ints(1), _ints(2), _ints(2)), _ints(2))
    zero = op.Constant(value_float=0.0)
    upper = op.Add(op.MatMul(op.Max(grouped, zero), op.Transpose(high, perm=[0, 1, 3, 2])),
                   op.MatMul(op.Min(grouped, zero), op.Transpose(low, perm=[0, 1, 3, 2])))
    summed = op.ReduceSum(upper, _ints(2), keepdims=0)  # [B, Hkv, P]
    return op.Where(op.Unsqueeze(_page_valid(mask, page), _ints(1)), summed, op.Constant(value_float=float("-inf")))


def top_pages(scores, count):
    return _top_ascending(scores, count)


def _slots(pages, mask, page: int):
    """[B, Hkv, K · S] int64: the cache positions of the given pages, page after page (past the cache too)."""
    start = op.Unsqueeze(_start(mask, page), _ints(2, 3))  # [B, 1, 1, 1]
    offsets = op.Range(op.Constant(value_int=0), op.Constant(value_int=page), op.Constant(value_int=1))
    first = op.Unsqueeze(op.Mul(pages, op.Constant(value_int=page)), _ints(-1))  # [B, Hkv, K, 1]
    return op.Reshape(op.Add(op.Add(start, first), offsets), _ints(0, 0, -1))


def page_positions(pages, mask, page: int):
    return op.Min(_slots(pages, mask, page), op.Sub(_cached(mask), _ints(1)))


def page_mask(mask, pages, page: int):
    length = _cached(mask)
    slots = _slots(pages, mask, page)
    row = op.Unsqueeze(_row(mask), _ints(1))  # [B, 1, L + 1]
    row = op.Expand(row, op.Concat(op.Shape(pages, start=0, end=2), op.Shape(row, start=2), axis=0))
    chosen = op.GatherElements(row, op.Min(slots, op.Sub(length, _ints(1))), axis=2)
    outside = op.GreaterOrEqual(slots, length)
    if _is_bool(mask):
        chosen = op.And(chosen, op.Not(outside))
    else:
        lowest = float(torch.finfo(_TORCH_DTYPES[mask.dtype]).min)
        chosen = op.Where(outside, op.Cast(op.Constant(value_float=lowest), to=mask.dtype.value), chosen)
    new = op.Slice(row, _ints(-1), _ints(INT64_MAX), _ints(2))  # [B, Hkv, 1]
    return op.Unsqueeze(op.Concat(chosen, new, axis=-1), _ints(2))


DECODE_TRANSLATIONS = {
    torch.ops.tpc.group_attention.default: group_attention,
    torch.ops.tpc.top_positions.default: top_positions,
    torch.ops.tpc.gather_positions.default: gather_positions,
    torch.ops.tpc.page_scores.default: page_scores,
    torch.ops.tpc.top_pages.default: top_pages,
    torch.ops.tpc.page_positions.default: page_positions,
    torch.ops.tpc.page_mask.default: page_mask,
}
ALL_TRANSLATIONS = {**TRANSLATIONS, **DECODE_TRANSLATIONS}
