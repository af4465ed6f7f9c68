"""ONNX translations of the ``tpc::`` ops, standard opset-18 ops only.

Each function mirrors the reference implementation in :mod:`tpc.kernels.ops` with ONNX
ops that run anywhere (ONNX Runtime, TensorRT's parser): TopK with a constant K,
GatherElements, Softmax, integer Mul/Add/Mod. The table maps each op overload to its
translation for ``torch.onnx.export(custom_translation_table=...)``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxscript
import torch
from onnxscript import BOOL
from onnxscript import FLOAT as FLOAT_T
from onnxscript import INT64 as INT64_T
from onnxscript import ir
from onnxscript import opset18 as op

from tpc.methods import baseline

FLOAT = ir.DataType.FLOAT.value
INT64 = ir.DataType.INT64.value
BOOL_T = ir.DataType.BOOL.value
INT64_MAX = 2**63 - 1
EPS = 1e-12
UNROLL_ITERATIONS = 16  # WPR iterations up to this count are unrolled; more run in a Loop


def _const(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(array)))


def _fill(shape, value: float, dtype=onnx.TensorProto.FLOAT):
    return op.ConstantOfShape(shape, value=onnx.helper.make_tensor("v", dtype, [1], [value]))


def _static(x, dim: int) -> int:
    size = x.shape[dim]
    return int(size) if isinstance(size, int) or str(size).isdigit() else int(size.value)


def _unit(x):
    """x / max(||x||, eps) along the last axis, in float32 (torch.nn.functional.normalize)."""
    x = op.Cast(x, to=FLOAT)
    norm = op.Sqrt(op.ReduceSum(op.Mul(x, x), _ints(-1), keepdims=1))
    return op.Div(x, op.Max(norm, op.Constant(value_float=EPS)))


def _masked(logits, mask, is_bool: bool):
    """Apply an SDPA-style mask; ``is_bool`` comes from the graph input (sliced values lose their dtype)."""
    if mask is None:
        return logits
    if is_bool:
        return op.Where(mask, logits, op.Constant(value_float=float("-inf")))
    return op.Add(logits, op.Cast(mask, to=FLOAT))


def _is_bool(mask) -> bool:
    return mask is not None and mask.dtype == ir.DataType.BOOL


def _count(k):
    """A count as TopK's K input ([1] int64): a constant, or the graph's own scalar when the
    sequence length is symbolic (then K is computed at run time)."""
    return _ints(k) if isinstance(k, int) else op.Reshape(op.Cast(k, to=INT64), _ints(1))


def _any(k) -> bool:
    """False only for a constant 0; a computed count is at least 1 (see ``tpc.schedule``)."""
    return not isinstance(k, int) or k > 0


def _length(x, dim: int):
    """Size of ``dim``: an int when static, else a scalar int64 tensor read from the shape."""
    size = x.shape[dim]
    if isinstance(size, int) or str(size).isdigit():
        return int(str(size))
    return op.Squeeze(op.Shape(x, start=dim, end=dim + 1), _ints(0))


def _sort_ascending(index, k):
    """Sort int64 positions ascending (TopK on float: exact below 2^24, and TensorRT-friendly)."""
    ordered, _ = op.TopK(op.Cast(index, to=FLOAT), _count(k), axis=1, largest=0, sorted=1)
    return op.Cast(ordered, to=INT64)


def _prefix_then(scores_like, prefix: int, rest, k):
    """Concat the prefix positions 0..P-1 (per example) and ``rest`` sorted ascending; [B, 0]
    when both are empty (ToDRE's keep 0 in a VLM: no visual token kept)."""
    if not prefix and not _any(k):
        return _fill(op.Concat(_batch(scores_like), _ints(0), axis=0), 0, onnx.TensorProto.INT64)
    parts = []
    if prefix:
        pre = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=prefix), op.Constant(value_int=1)), _ints(0))
        parts.append(op.Expand(pre, op.Concat(op.Shape(scores_like, start=0, end=1), _ints(prefix), axis=0)))
    if _any(k):
        parts.append(_sort_ascending(rest, k))
    return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=1)


def _rows(index, like):
    """Expand a [B, K] index to [B, K, C...] matching ``like``'s trailing dims (for GatherElements)."""
    shape = op.Concat(op.Shape(index), op.Shape(like, start=2), axis=0)
    return op.Expand(op.Unsqueeze(index, _ints(-1)), shape)


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _batch(x):
    return op.Shape(x, start=0, end=1)


def _logits(q, k, scale: float):
    """q kᵀ · scale in float32 ([B, H, M, d] x [B, H, N, d] -> [B, H, M, N])."""
    kt = op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 1, 3, 2])
    return op.Mul(op.MatMul(op.Cast(q, to=FLOAT), kt), op.Constant(value_float=scale))


def cls_attention(q, k, scale: float, mask=None):
    logits = _logits(op.Slice(q, _ints(0), _ints(1), _ints(2)), k, scale)  # [B, H, 1, N]
    row = None if mask is None else op.Slice(mask, _ints(0), _ints(1), _ints(-2))
    probs = op.Softmax(_masked(logits, row, _is_bool(mask)), axis=-1)
    return op.Squeeze(op.ReduceMean(probs, _ints(1), keepdims=0), _ints(1))


def random_scores(x, seed: int):
    p = baseline.PRIME
    n = op.Squeeze(op.Shape(x, start=1, end=2), _ints(0))
    b = op.Squeeze(_batch(x), _ints(0))
    one, zero = op.Constant(value_int=1), op.Constant(value_int=0)
    pos = op.Unsqueeze(op.Range(zero, n, one), _ints(0))
    row = op.Unsqueeze(op.Range(zero, b, one), _ints(1))

    def c(v: int):
        return op.Constant(value_int=v)

    def mod(v):
        return op.Mod(v, c(p))

    h = mod(op.Add(op.Add(mod(op.Mul(pos, c(baseline.A))), mod(op.Mul(row, c(baseline.B)))), c(baseline.seed_term(seed))))
    h = mod(op.Mul(h, h))
    h = mod(op.Add(op.Mul(h, c(baseline.A)), c(baseline.D)))
    h = mod(op.Mul(h, h))
    return op.Div(op.Cast(h, to=FLOAT), op.Constant(value_float=float(p)))


def select_topk(scores, k, num_prefix: int):
    best = None
    if _any(k):
        rest = op.Slice(scores, _ints(num_prefix), _ints(INT64_MAX), _ints(1))
        _, best = op.TopK(rest, _count(k), axis=1, largest=1, sorted=1)
        best = op.Add(best, op.Constant(value_int=num_prefix))
    return _prefix_then(scores, num_prefix, best, k)


def gather_tokens(x, index):
    full = op.Concat(_batch(index), op.Shape(x, start=1), axis=0)
    src = op.Expand(x, full)
    rank = len(x.shape)
    idx = op.Reshape(index, op.Concat(op.Shape(index), _ints(*([1] * (rank - 2))), axis=0)) if rank > 2 else index
    idx = op.Expand(idx, op.Concat(op.Shape(index), op.Shape(x, start=2), axis=0))
    return op.GatherElements(src, idx, axis=1)


def restore_tokens(base, index, src):
    full = op.Expand(base, op.Concat(_batch(index), op.Shape(base, start=1), axis=0))
    return op.ScatterElements(full, _rows(index, src), op.Cast(src, to=base.dtype.value), axis=1)


def fuse_tokens(x, scores, index):
    kept = op.GatherElements(x, _rows(index, x), axis=1)
    dropped = op.ScatterElements(op.Cast(op.Expand(op.Constant(value_float=1.0), op.Shape(scores)), to=FLOAT),
                                 index, op.Cast(op.Expand(op.Constant(value_float=0.0), op.Shape(index)), to=FLOAT), axis=1)
    weights = op.Cast(op.Mul(dropped, op.Cast(scores, to=FLOAT)), to=x.dtype.value)
    fused = op.ReduceSum(op.Mul(x, op.Unsqueeze(weights, _ints(-1))), _ints(1), keepdims=1)
    return op.Concat(kept, fused, axis=1)


def attention_probs(q, k, scale: float, mask=None):
    return op.Softmax(_masked(_logits(q, k, scale), mask, _is_bool(mask)), axis=-1)


@onnxscript.script()
def _pagerank_loop(s0: FLOAT_T[...], a: FLOAT_T[...], k: FLOAT_T[...], rows: FLOAT_T[...], iterations: INT64_T) -> FLOAT_T[...]:
    s = s0
    for _t in range(iterations):
        s = op.Mul(op.MatMul(op.Div(op.Mul(s, k), rows), a), k)
    return s


def weighted_pagerank(attn, iterations: int, v_min: float, v_max: float, keep=None):
    batch, tokens = op.Shape(attn, start=0, end=1), op.Shape(attn, start=3, end=4)
    if keep is None:
        keep = op.Cast(_fill(op.Concat(batch, tokens, axis=0), 1.0), to=BOOL_T)
    k = op.Cast(keep, to=FLOAT)
    a = op.Cast(attn, to=FLOAT)
    k_row = op.Unsqueeze(k, _ints(1, 2))  # [B, 1, 1, N]
    rows = op.Max(op.MatMul(a, op.Unsqueeze(k, _ints(1, 3))), op.Constant(value_float=EPS))  # [B, H, N, 1]
    rows = op.Transpose(rows, perm=[0, 1, 3, 2])  # [B, H, 1, N]: query i's kept attention mass
    s = op.Expand(k_row, op.Concat(op.Shape(attn, start=0, end=2), _ints(1), tokens, axis=0))
    if iterations > UNROLL_ITERATIONS:
        s = _pagerank_loop(s, a, k_row, rows, op.Constant(value_int=iterations))
    else:  # a few MatMuls cost less than a Loop's per-iteration overhead in ONNX Runtime
        for _ in range(iterations):
            s = op.Mul(op.MatMul(op.Div(op.Mul(s, k_row), rows), a), k_row)
    s = op.Squeeze(s, _ints(2))  # [B, H, N]
    count = op.Max(op.ReduceSum(k, _ints(-1), keepdims=1), op.Constant(value_float=1.0))  # [B, 1]
    mean = op.Div(op.ReduceSum(s, _ints(-1), keepdims=1), op.Unsqueeze(count, _ints(1)))
    dev = op.Sub(s, mean)
    var = op.Div(op.ReduceSum(op.Mul(op.Mul(dev, dev), op.Unsqueeze(k, _ints(1))), _ints(-1), keepdims=0), count)
    use = op.Cast(op.And(op.GreaterOrEqual(var, op.Constant(value_float=v_min)),
                         op.LessOrEqual(var, op.Constant(value_float=v_max))), to=FLOAT)
    any_head = op.Greater(op.ReduceSum(use, _ints(-1), keepdims=1), op.Constant(value_float=0.0))
    use = op.Where(any_head, use, op.Constant(value_float=1.0))
    num = op.ReduceSum(op.Mul(op.Mul(s, s), op.Unsqueeze(use, _ints(-1))), _ints(1), keepdims=0)
    score = op.Sqrt(op.Div(num, op.ReduceSum(use, _ints(-1), keepdims=1)))
    return op.Where(keep, score, op.Constant(value_float=float("-inf")))


def similarity_keep(importance, keys, drop: int, num_prefix: int, partition: str):
    n = _static(importance, 1)
    rest = n - num_prefix
    n_a = rest // 2
    drop = min(drop, n_a)
    keep = op.Cast(_fill(op.Shape(importance), 1.0), to=BOOL_T)
    if drop <= 0:
        return keep
    if partition == "sequential":
        scores = op.Slice(importance, _ints(num_prefix), _ints(INT64_MAX), _ints(1))
        _, order = op.TopK(scores, _ints(rest), axis=1, largest=0, sorted=1)
        order = op.Add(order, op.Constant(value_int=num_prefix))
        group_a = op.Slice(order, _ints(0), _ints(n_a), _ints(1))
        group_b = op.Slice(order, _ints(n_a), _ints(rest), _ints(1))
    else:
        pos = np.arange(num_prefix, n)
        a_pos = pos[1::2][:n_a]
        b_pos = np.concatenate([pos[0::2], pos[1::2][n_a:]])
        shape_a = op.Concat(op.Shape(importance, start=0, end=1), _ints(len(a_pos)), axis=0)
        shape_b = op.Concat(op.Shape(importance, start=0, end=1), _ints(len(b_pos)), axis=0)
        group_a = op.Expand(_const(a_pos[None].astype(np.int64)), shape_a)
        group_b = op.Expand(_const(b_pos[None].astype(np.int64)), shape_b)
    unit = _unit(keys)
    ua = op.GatherElements(unit, _rows(group_a, unit), axis=1)
    ub = op.GatherElements(unit, _rows(group_b, unit), axis=1)
    best = op.ReduceMax(op.MatMul(ua, op.Transpose(ub, perm=[0, 2, 1])), _ints(-1), keepdims=0)
    _, top = op.TopK(best, _ints(drop), axis=1, largest=1, sorted=1)
    dropped = op.GatherElements(group_a, top, axis=1)
    false = op.Cast(_fill(op.Shape(dropped), 0.0), to=BOOL_T)
    return op.ScatterElements(keep, dropped, false, axis=1)


@onnxscript.script()
def _farthest_loop(dist: FLOAT_T[...], nearest: FLOAT_T[...], count: INT64_T) -> FLOAT_T[...]:
    mind = nearest
    for _t in range(count):
        i = op.ArgMax(mind, axis=1, keepdims=1)  # [B, 1], the first maximum on ties
        mind = op.Min(mind, op.GatherND(dist, i, batch_dims=1))  # dist's diagonal is -inf: the pick leaves the pool
    return mind


def _cosine_distance(features):
    unit = _unit(features)
    return op.Sub(op.Constant(value_float=1.0), op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1])))


def _arange(n):
    """[1, n] int64 positions 0..n-1 (n an int or a scalar tensor)."""
    if isinstance(n, int):
        return _const(np.arange(n, dtype=np.int64)[None])
    return op.Unsqueeze(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)), _ints(0))


def _as_float(n):
    return op.Constant(value_float=float(n)) if isinstance(n, int) else op.Cast(n, to=FLOAT)


def _picked_distance(features, n):
    """1 - cos with -inf on the diagonal, so min(nearest, row of a pick) removes the pick itself."""
    if isinstance(n, int):
        diag = _const(np.where(np.eye(n, dtype=bool), np.float32(-np.inf), np.float32(0.0))[None])
    else:
        pos = _arange(n)
        eye = op.Equal(op.Transpose(pos, perm=[1, 0]), pos)
        diag = op.Unsqueeze(op.Where(eye, op.Constant(value_float=float("-inf")), op.Constant(value_float=0.0)), _ints(0))
    return op.Add(_cosine_distance(features), diag)


def _minus_one(k):
    return k - 1 if isinstance(k, int) else op.Sub(op.Cast(k, to=INT64), op.Constant(value_int=1))


def _greedy_taken(dist, nearest, count):
    """Run ``count`` max-min picks; return the final distances (-inf marks every taken token).

    Only the set of picks matters (the kept positions are sorted afterwards), so the loop carries
    one [B, N] tensor and runs three ops per pick.
    """
    if isinstance(count, int):
        return _farthest_loop(dist, nearest, op.Constant(value_int=count)) if count else nearest
    return _farthest_loop(dist, nearest, count)


def _plus(k, offset: int):
    if isinstance(k, int):
        return k + offset
    return op.Add(op.Cast(k, to=INT64), op.Constant(value_int=offset)) if offset else k


def _taken_positions(mind, n, count, offset: int = 0):
    """The ``count`` positions marked -inf in ``mind`` ([B, n]), ascending, plus ``offset``."""
    taken = op.Equal(mind, op.Constant(value_float=float("-inf")))
    positions = op.Cast(_arange(n), to=FLOAT)
    beyond = op.Constant(value_float=float(2 * n)) if isinstance(n, int) else op.Mul(_as_float(n), op.Constant(value_float=2.0))
    keyed = op.Where(taken, positions, beyond)
    ordered, _ = op.TopK(keyed, _count(count), axis=1, largest=0, sorted=1)
    positions = op.Cast(ordered, to=INT64)
    return op.Add(positions, op.Constant(value_int=offset)) if offset else positions


def _positions(like, n: int):
    return op.Expand(_const(np.arange(n, dtype=np.int64)[None]), op.Shape(like))


def _row(dist, i):
    return op.GatherND(dist, i, batch_dims=1)  # dist [B, N, N], i [B, 1] -> [B, N]


def _demote_padding(scores, valid, n):
    """As ``tpc.methods.kcenter.demote_padding``: padding at -4 - j/n, below every real token;
    -inf (already taken: the prefix) stays."""
    if valid is None:
        return scores
    if isinstance(n, int):
        order = _const((-4.0 - np.arange(n, dtype=np.float32) / n)[None])
    else:
        order = op.Sub(op.Constant(value_float=-4.0), op.Div(op.Cast(_arange(n), to=FLOAT), _as_float(n)))
    return op.Where(op.Or(valid, op.IsInf(scores, detect_positive=0)), scores, order)


def kcenter(features, k, num_prefix: int, valid=None):
    if not _any(k):
        return _prefix_then(features, num_prefix, None, 0)
    n = _length(features, 1)
    dist = _picked_distance(features, n)
    if num_prefix:  # the prefix tokens are the first centers (their own entries are -inf already)
        nearest = op.ReduceMin(op.Slice(dist, _ints(0), _ints(num_prefix), _ints(1)), _ints(1), keepdims=0)
        mind = _greedy_taken(dist, _demote_padding(nearest, valid, n), k)
    else:  # the first center: the token farthest from the mean feature
        feats = op.Cast(features, to=FLOAT)
        mean = op.ReduceMean(feats, _ints(1), keepdims=1)
        far = op.Slice(_cosine_distance(op.Concat(mean, feats, axis=1)), _ints(0, 1), _ints(1, INT64_MAX), _ints(1, 2))
        first = op.ArgMax(_demote_padding(op.Squeeze(far, _ints(1)), valid, n), axis=1, keepdims=1)
        mind = _greedy_taken(dist, _demote_padding(_row(dist, first), valid, n), _minus_one(k))
    return _taken_positions(mind, n, _plus(k, num_prefix))


def divprune(features, k, num_prefix: int, valid=None):
    if not _any(k):
        return _prefix_then(features, num_prefix, None, 0)
    n = _length(features, 1)
    n = n - num_prefix if isinstance(n, int) else op.Sub(n, op.Constant(value_int=num_prefix))
    dist = _picked_distance(op.Slice(features, _ints(num_prefix), _ints(INT64_MAX), _ints(1)), n)
    if valid is not None:
        valid = op.Slice(valid, _ints(num_prefix), _ints(INT64_MAX), _ints(-1))
    # farthest from its nearest neighbour: the diagonal must not count as a neighbour
    nn = op.ReduceMin(op.Where(op.IsInf(dist, detect_positive=0), op.Constant(value_float=float("inf")), dist),
                      _ints(2), keepdims=0)
    first = op.ArgMax(_demote_padding(nn, valid, n), axis=1, keepdims=1)
    mind = _greedy_taken(dist, _demote_padding(_row(dist, first), valid, n), _minus_one(k))
    return _prefix_then(features, num_prefix, _taken_positions(mind, n, k, num_prefix), k)


def bipartite_match(keys, r: int, num_prefix: int):
    n = _static(keys, 1)
    batch_n = op.Concat(op.Shape(keys, start=0, end=1), _ints(n), axis=0)
    positions = _positions(_fill(batch_n, 0.0), n)
    if r == 0:
        return positions, positions
    unit = _unit(keys)
    ua = op.Slice(unit, _ints(0), _ints(INT64_MAX), _ints(1), _ints(2))
    ub = op.Slice(unit, _ints(1), _ints(INT64_MAX), _ints(1), _ints(2))
    scores = op.MatMul(ua, op.Transpose(ub, perm=[0, 2, 1]))  # [B, nA, nB]
    a_pos, b_pos = np.arange(0, n, 2), np.arange(1, n, 2)
    blocked = (a_pos < num_prefix)[:, None] | (b_pos < num_prefix)[None, :]
    scores = op.Where(_const(blocked[None]), op.Constant(value_float=float("-inf")), scores)
    best = op.ReduceMax(scores, _ints(-1), keepdims=0)
    partner = op.ArgMax(scores, axis=-1, keepdims=0)
    _, order = op.TopK(best, _ints(len(a_pos)), axis=1, largest=1, sorted=1)
    src = op.Slice(order, _ints(0), _ints(r), _ints(1))
    two, one = op.Constant(value_int=2), op.Constant(value_int=1)
    merged = op.Mul(src, two)
    dst = op.Add(op.Mul(op.GatherElements(partner, src, axis=1), two), one)
    # ToMe's order, as in tpc.methods.tome: a sort key per token, prefix < unmerged A < B < merged A
    if num_prefix > 0:
        a_key = op.Expand(_const(np.where(a_pos < num_prefix, a_pos, n + a_pos)[None].astype(np.float32)), op.Shape(best))
    else:
        a_rank = op.ScatterElements(op.Cast(_fill(op.Shape(order), 0.0), to=INT64), order, _positions(order, len(a_pos)), axis=1)
        a_key = op.Cast(op.Add(a_rank, op.Constant(value_int=n)), to=FLOAT)
    b_key = op.Expand(_const(np.where(b_pos < num_prefix, b_pos, 2 * n + b_pos)[None].astype(np.float32)),
                      op.Concat(op.Shape(best, start=0, end=1), _ints(len(b_pos)), axis=0))
    by_position = np.argsort(np.concatenate([a_pos, b_pos]))  # [A..., B...] back to sequence order
    key = op.Gather(op.Concat(a_key, b_key, axis=1), _const(by_position), axis=1)
    key = op.ScatterElements(key, merged, op.Cast(_fill(op.Shape(merged), float(3 * n)), to=FLOAT), axis=1)
    _, index = op.TopK(key, _ints(n - r), axis=1, largest=0, sorted=1)
    slot = op.ScatterElements(op.Cast(_fill(batch_n, 0.0), to=INT64), index, _positions(index, n - r), axis=1)
    assign = op.ScatterElements(slot, merged, op.GatherElements(slot, dst, axis=1), axis=1)
    return index, assign


def merge_tokens(x, weights, assign, count: int, mean: bool):
    # A one-hot [B, count, N] matrix of the assignment turns the scatter-add into a MatMul:
    # no ScatterElements reduction, which TensorRT's parser does not take.
    slots = _const(np.arange(count, dtype=np.int64)[None, :, None])
    onehot = op.Cast(op.Equal(op.Unsqueeze(assign, _ints(1)), slots), to=FLOAT)  # [B, count, N]
    w = op.Cast(weights, to=FLOAT)
    total = op.Squeeze(op.MatMul(onehot, op.Unsqueeze(w, _ints(-1))), _ints(-1))  # [B, count]
    acc = op.MatMul(onehot, op.Mul(op.Cast(x, to=FLOAT), op.Unsqueeze(w, _ints(-1))))
    if mean:
        acc = op.Div(acc, op.Unsqueeze(op.Max(total, op.Constant(value_float=EPS)), _ints(-1)))
    return op.Cast(acc, to=x.dtype.value), total


def sparse_attention(q, k, v, index, scale: float):
    if index is not None:
        heads, dim = op.Shape(k, start=1, end=2), op.Shape(k, start=3, end=4)
        rows = op.Unsqueeze(op.Unsqueeze(index, _ints(1)), _ints(-1))  # [B, 1, K, 1]
        shape = op.Concat(op.Shape(index, start=0, end=1), heads, op.Shape(index, start=1, end=2), dim, axis=0)
        k = op.GatherElements(k, op.Expand(rows, shape), axis=2)
        v = op.GatherElements(v, op.Expand(rows, shape), axis=2)
    probs = attention_probs(q, k, scale)
    out = op.Cast(op.MatMul(probs, op.Cast(v, to=FLOAT)), to=q.dtype.value)
    return out, op.ReduceSum(probs, _ints(-2), keepdims=0)


TRANSLATIONS = {
    torch.ops.tpc.cls_attention.default: cls_attention,
    torch.ops.tpc.random_scores.default: random_scores,
    torch.ops.tpc.select_topk.default: select_topk,
    torch.ops.tpc.gather_tokens.default: gather_tokens,
    torch.ops.tpc.fuse_tokens.default: fuse_tokens,
    torch.ops.tpc.restore_tokens.default: restore_tokens,
    torch.ops.tpc.attention_probs.default: attention_probs,
    torch.ops.tpc.weighted_pagerank.default: weighted_pagerank,
    torch.ops.tpc.similarity_keep.default: similarity_keep,
    torch.ops.tpc.kcenter.default: kcenter,
    torch.ops.tpc.divprune.default: divprune,
    torch.ops.tpc.bipartite_match.default: bipartite_match,
    torch.ops.tpc.merge_tokens.default: merge_tokens,
    torch.ops.tpc.sparse_attention.default: sparse_attention,
}
