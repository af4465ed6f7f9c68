"""ONNX translations of the ``tpc::`` ops, standard opset-18 ops only.

Each function mirrors the reference implementation in :mod:`tpc.kernels.ops` with ONNX
ops that run anywhere (ONNX Runtime, TensorRT's parser): TopK with a constant K,
GatherElements, Softmax, integer Mul/Add/Mod. The table maps each op overload to its
translation for ``torch.onnx.export(custom_translation_table=...)``.
"""

from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from tpc.methods import baseline

FLOAT = ir.DataType.FLOAT.value
INT64 = ir.DataType.INT64.value
INT64_MAX = 2**63 - 1


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _batch(x):
    return op.Shape(x, start=0, end=1)


def cls_attention(q, k, scale: float, mask=None):
    q0 = op.Cast(op.Slice(q, _ints(0), _ints(1), _ints(2)), to=FLOAT)  # [B, H, 1, d]
    kt = op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 1, 3, 2])
    logits = op.Mul(op.MatMul(q0, kt), op.Constant(value_float=scale))  # [B, H, 1, N]
    if mask is not None:
        row = op.Slice(mask, _ints(0), _ints(1), _ints(-2))
        if mask.dtype == ir.DataType.BOOL:
            logits = op.Where(row, logits, op.Constant(value_float=float("-inf")))
        else:
            logits = op.Add(logits, op.Cast(row, to=FLOAT))
    probs = op.Softmax(logits, axis=-1)
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

    h = op.Add(op.Add(op.Mul(pos, c(baseline._A)), op.Mul(row, c(baseline._B))), c((seed % p) * baseline._C + baseline._D))
    h = op.Mod(h, c(p))
    h = op.Mod(op.Mul(h, h), c(p))
    h = op.Mod(op.Add(op.Mul(h, c(baseline._A)), c(baseline._D)), c(p))
    h = op.Mod(op.Mul(h, h), c(p))
    return op.Div(op.Cast(h, to=FLOAT), op.Constant(value_float=float(p)))


def select_topk(scores, k: int, num_prefix: int):
    parts = []
    if num_prefix:
        prefix = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=num_prefix), op.Constant(value_int=1)), _ints(0))
        parts.append(op.Expand(prefix, op.Concat(_batch(scores), _ints(num_prefix), axis=0)))
    if k:
        rest = op.Slice(scores, _ints(num_prefix), _ints(INT64_MAX), _ints(1))
        _, best = op.TopK(rest, _ints(k), axis=1, largest=1, sorted=1)
        # Sort the kept positions ascending; TopK on float keeps TensorRT happy (indices < 2^24 are exact).
        ordered, _ = op.TopK(op.Cast(best, to=FLOAT), _ints(k), axis=1, largest=0, sorted=1)
        parts.append(op.Add(op.Cast(ordered, to=INT64), op.Constant(value_int=num_prefix)))
    return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=1)


def gather_tokens(x, index):
    full = op.Concat(_batch(index), op.Shape(x, start=1), axis=0)
    src = op.Expand(x, full)
    rank = len(x.shape)
    idx = op.Reshape(index, op.Concat(op.Shape(index), _ints(*([1] * (rank - 2))), axis=0)) if rank > 2 else index
    idx = op.Expand(idx, op.Concat(op.Shape(index), op.Shape(x, start=2), axis=0))
    return op.GatherElements(src, idx, axis=1)


TRANSLATIONS = {
    torch.ops.tpc.cls_attention.default: cls_attention,
    torch.ops.tpc.random_scores.default: random_scores,
    torch.ops.tpc.select_topk.default: select_topk,
    torch.ops.tpc.gather_tokens.default: gather_tokens,
}
