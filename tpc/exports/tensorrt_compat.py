"""Does TensorRT's ONNX parser take this model? A check that runs on the CPU, without TensorRT.

It encodes the parser's limits that matter for tpc's graphs (TensorRT 10, onnx-tensorrt's
operator support matrix): the opset range, the operators it imports, and per-operator
restrictions — TopK needs a constant K of at most 3840, ScatterElements/ScatterND take no
``reduction``, only the default ONNX domain and tpc's own plugin ops, no DOUBLE tensors. Loop and If
bodies are checked too. A model that passes can still fail on a GPU for other reasons; one
that fails here would fail there.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import numpy_helper

from tpc.exports.onnx_plugins import PLUGIN_DOMAIN, PLUGIN_OPS

MAX_OPSET = 20
TOPK_MAX_K = 3840

# Operators onnx-tensorrt (TensorRT 10) imports; tpc's graphs use a small subset of them.
SUPPORTED = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max MaxPool Mean Min Mod Mul
Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round
ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split
Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())


def _constants(graph: onnx.GraphProto, outer: dict) -> dict:
    values = dict(outer)
    for init in graph.initializer:
        values[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    values[node.output[0]] = onnx.helper.get_attribute_value(attr)
    return values


def _check_graph(graph: onnx.GraphProto, outer: dict, where: str) -> Iterable[str]:
    consts = _constants(graph, outer)
    for tensor in list(graph.initializer):
        if tensor.data_type == onnx.TensorProto.DOUBLE:
            yield f"{where}initializer {tensor.name} is DOUBLE"
    for node in graph.node:
        name = f"{where}{node.op_type} node {node.name or node.output[0]}"
        if node.domain == PLUGIN_DOMAIN and node.op_type in PLUGIN_OPS:
            namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), None)
            if namespace != PLUGIN_DOMAIN:
                yield f"{name} lacks plugin_namespace={PLUGIN_DOMAIN!r}: TensorRT's parser would not find tpc's plugin"
            continue
        if node.domain not in ("", "ai.onnx"):
            yield f"{name} is in domain {node.domain!r}, which TensorRT's parser only takes for registered plugins"
            continue
        if node.op_type not in SUPPORTED:
            yield f"{name}: TensorRT's ONNX parser has no importer for {node.op_type}"
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "TopK":
            k = consts.get(node.input[1])
            if k is None:
                yield f"{name}: {RUNTIME_K}"
            elif int(getattr(k, "reshape", lambda *_: k)(-1)[0]) > TOPK_MAX_K:
                yield f"{name}: K = {int(k.reshape(-1)[0])} exceeds TensorRT's TopK limit of {TOPK_MAX_K}"
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = attrs.get("reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if reduction != "none":
                yield f"{name}: reduction={reduction!r}; TensorRT's parser takes none"
        if node.op_type == "Cast" and attrs.get("to") == onnx.TensorProto.DOUBLE:
            yield f"{name}: casts to DOUBLE"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _check_graph(attr.g, consts, f"{name} > ")


def _dynamic_length(model: onnx.ModelProto) -> bool:
    """A graph input of rank 2 or more whose dim 1 is symbolic (a token input of dynamic length)."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and not dims[1].HasField("dim_value"):
            return True
    return False


RUNTIME_K = "K is computed at run time; TensorRT needs a constant K"
DYNAMIC_LENGTH = ("the sequence length is dynamic, so every TopK K is computed from it at run time; TensorRT needs a "
                  "constant K: compile with --seq-len N for a TensorRT engine")


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT's ONNX parser would refuse ``model`` (empty when it takes it).

    A dynamic-length export is said once (``DYNAMIC_LENGTH``) instead of once per TopK.
    """
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            problems.append(f"opset {opset.version} is above the {MAX_OPSET} TensorRT 10 takes")
    found = list(_check_graph(model.graph, {}, ""))
    if _dynamic_length(model) and any(p.endswith(RUNTIME_K) for p in found):
        found = [DYNAMIC_LENGTH] + [p for p in found if not p.endswith(RUNTIME_K)]
    problems.extend(found)
    return problems
