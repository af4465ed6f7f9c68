"""The engine's ONNX: tpc's TensorRT plugin ops as single nodes, and their reference spelling.

For a TensorRT engine, ``gather_tokens`` and ``sparse_attention`` stay one node each in domain
``tpc`` (op type = plugin name, ``plugin_namespace="tpc"``, ``aot=1``: how TensorRT's ONNX
parser finds a Python plugin and picks its ahead-of-time kernel; see
:mod:`tpc.exports.tensorrt_plugins`). Their ONNX schemas are registered here, since the exporter
and checker need one for every op, and :func:`plugin_reference_functions` spells them out in
standard ops so ONNX Runtime can run an engine's ONNX on the CPU: the check of the plugin
nodes' wiring that needs no TensorRT.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from tpc.exports import onnx_ops

PLUGIN_DOMAIN = "tpc"
PLUGIN_OPS = ("gather_tokens", "sparse_attention")
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _register_schemas() -> onnxscript.values.Opset:
    s = onnx.defs.OpSchema
    plugin_attrs = [s.Attribute("plugin_namespace", s.AttrType.STRING, "the plugin's namespace"),
                    s.Attribute("aot", s.AttrType.INT, "1: use the ahead-of-time kernel")]
    schemas = [
        s("gather_tokens", PLUGIN_DOMAIN, 1,
          doc="Rows of x [B or 1, N, ...] picked by index [B, K]: [B, K, ...].",
          inputs=[s.FormalParameter("x", "T"), s.FormalParameter("index", "tensor(int64)")],
          outputs=[s.FormalParameter("y", "T")],
          type_constraints=[("T", _FLOAT_TYPES, "row types")], attributes=plugin_attrs),
        s("sparse_attention", PLUGIN_DOMAIN, 1,
          doc="softmax(q k[index]ᵀ scale) v[index] [B, H, M, d], and per-query-block attention mass "
              "[B, H, blocks, K] (summed over axis 2 by the graph).",
          inputs=[s.FormalParameter("q", "T"), s.FormalParameter("k", "T"), s.FormalParameter("v", "T"),
                  s.FormalParameter("index", "tensor(int64)")],
          outputs=[s.FormalParameter("out", "T"), s.FormalParameter("mass", "tensor(float)")],
          type_constraints=[("T", _FLOAT_TYPES, "q, k, v types")],
          attributes=[s.Attribute("scale", s.AttrType.FLOAT, "logit scale"), *plugin_attrs]),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, PLUGIN_DOMAIN):
            onnx.defs.register_schema(schema)
    return onnxscript.values.Opset(PLUGIN_DOMAIN, 1)


_PLUGINS = _register_schemas()


def gather_tokens(x, index):
    if x.dtype not in _FLOATS:  # masks and other non-float side tensors stay standard
        return onnx_ops.gather_tokens(x, index)
    return _PLUGINS.gather_tokens(x, index, plugin_namespace=PLUGIN_DOMAIN, aot=1)


def sparse_attention(q, k, v, index, scale: float):
    if index is None:  # every key: the plugin takes an explicit [B, N] index
        keys = op.Squeeze(op.Shape(k, start=2, end=3), onnx_ops._ints(0))
        arange = op.Range(op.Constant(value_int=0), keys, op.Constant(value_int=1))
        index = op.Expand(op.Unsqueeze(arange, onnx_ops._ints(0)),
                          op.Concat(op.Shape(q, start=0, end=1), op.Shape(k, start=2, end=3), axis=0))
    out, partial = _PLUGINS.sparse_attention(q, k, v, index, scale=scale, plugin_namespace=PLUGIN_DOMAIN, aot=1,
                                             _num_outputs=2)
    return out, op.ReduceSum(partial, onnx_ops._ints(2), keepdims=0)


PLUGIN_TRANSLATIONS = {
    **onnx_ops.TRANSLATIONS,
    torch.ops.tpc.gather_tokens.default: gather_tokens,
    torch.ops.tpc.sparse_attention.default: sparse_attention,
}


def plugin_reference_functions() -> list[onnx.FunctionProto]:
    """The plugin ops in standard ops, as ONNX functions of domain ``tpc`` (for ONNX Runtime).

    ``sparse_attention``'s mass comes out as one block ([B, H, 1, K]): the graph sums axis 2,
    so the sum is the plugin's whatever its block count.
    """
    h = onnx.helper
    one = h.make_tensor("one", onnx.TensorProto.INT64, [1], [1])
    gather_nodes = [
        h.make_node("Shape", ["index"], ["index_shape"]),
        h.make_node("Shape", ["index"], ["batch"], start=0, end=1),
        h.make_node("Shape", ["x"], ["x_tail"], start=1),
        h.make_node("Concat", ["batch", "x_tail"], ["full"], axis=0),
        h.make_node("Expand", ["x", "full"], ["src"]),
        h.make_node("Shape", ["x"], ["rest"], start=2),
        h.make_node("Shape", ["rest"], ["rest_rank"]),
        h.make_node("ConstantOfShape", ["rest_rank"], ["ones"], value=one),
        h.make_node("Concat", ["index_shape", "ones"], ["index_rank_shape"], axis=0),
        h.make_node("Reshape", ["index", "index_rank_shape"], ["index_ranked"]),
        h.make_node("Concat", ["index_shape", "rest"], ["target"], axis=0),
        h.make_node("Expand", ["index_ranked", "target"], ["rows"]),
        h.make_node("GatherElements", ["src", "rows"], ["y"], axis=1),
    ]
    scale = h.make_node("Constant", [], ["scale"])
    scale.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="scale", type=onnx.AttributeProto.FLOAT))
    axes = h.make_tensor("axes", onnx.TensorProto.INT64, [2], [1, -1])
    attention_nodes = [
        h.make_node("Constant", [], ["axes"], value=axes),
        h.make_node("Unsqueeze", ["index", "axes"], ["rows"]),  # [B, 1, K, 1]
        h.make_node("Shape", ["index"], ["kept"], start=1, end=2),
        h.make_node("Shape", ["k"], ["bh"], start=0, end=2),
        h.make_node("Shape", ["k"], ["d"], start=3, end=4),
        h.make_node("Concat", ["bh", "kept", "d"], ["sel_shape"], axis=0),
        h.make_node("Expand", ["rows", "sel_shape"], ["rows_full"]),
        h.make_node("GatherElements", ["k", "rows_full"], ["k_sel"], axis=2),
        h.make_node("GatherElements", ["v", "rows_full"], ["v_sel"], axis=2),
        h.make_node("Cast", ["q"], ["qf"], to=onnx.TensorProto.FLOAT),
        h.make_node("Cast", ["k_sel"], ["kf"], to=onnx.TensorProto.FLOAT),
        h.make_node("Cast", ["v_sel"], ["vf"], to=onnx.TensorProto.FLOAT),
        h.make_node("Transpose", ["kf"], ["kt"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["qf", "kt"], ["qk"]),
        scale,
        h.make_node("Mul", ["qk", "scale"], ["logits"]),
        h.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        h.make_node("MatMul", ["probs", "vf"], ["outf"]),
        h.make_node("CastLike", ["outf", "q"], ["out"]),
        h.make_node("Constant", [], ["query_axis"], value=h.make_tensor("query_axis", onnx.TensorProto.INT64, [1], [2])),
        h.make_node("ReduceSum", ["probs", "query_axis"], ["mass"], keepdims=1),
    ]
    opsets = [h.make_opsetid("", 18)]
    return [
        h.make_function(PLUGIN_DOMAIN, "gather_tokens", ["x", "index"], ["y"], gather_nodes, opsets,
                        attributes=["plugin_namespace", "aot"]),
        h.make_function(PLUGIN_DOMAIN, "sparse_attention", ["q", "k", "v", "index"], ["out", "mass"], attention_nodes, opsets,
                        attributes=["scale", "plugin_namespace", "aot"]),
    ]
