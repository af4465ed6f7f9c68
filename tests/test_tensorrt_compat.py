"""The TensorRT-compatibility check on the CPU: every method's ONNX passes; known-bad graphs fail."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tpc
from models import TEST_MODELS
from specs import SPECS
from tpc.exports.tensorrt import engine_onnx
from tpc.exports.tensorrt_compat import tensorrt_problems


@pytest.mark.slow  # the fast lane checks the rules on the graphs below; test_onnx.py exports the first spec
@pytest.mark.parametrize("spec", [*SPECS, "zero-tprune+iterations=20"])
def test_every_method_lowers_to_what_tensorrt_parses(exported, spec):
    _, path, _ = exported("timm_vit", spec)  # the ONNX of to_onnx, as tpc.export wrote it
    assert tensorrt_problems(onnx.load(path)) == []


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
I = helper.make_tensor_value_info("i", TensorProto.INT64, None)


def test_topk_needs_a_constant_small_k():
    dynamic = _model([helper.make_node("Shape", ["x"], ["k"], start=1), helper.make_node("TopK", ["x", "k"], ["y", "i"])], [X], [Y, I])
    assert any("constant K" in p for p in tensorrt_problems(dynamic))
    big = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [X], [Y, I], [numpy_helper.from_array(np.array([4000]), "k")])
    assert any("3840" in p for p in tensorrt_problems(big))
    fine = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [X], [Y, I], [numpy_helper.from_array(np.array([3]), "k")])
    assert tensorrt_problems(fine) == []


def test_scatter_reduction_unknown_ops_domains_and_opset():
    scatter = helper.make_node("ScatterElements", ["x", "idx", "x"], ["y"], reduction="add")
    idx = numpy_helper.from_array(np.zeros((1, 8), dtype=np.int64), "idx")
    assert any("reduction" in p for p in tensorrt_problems(_model([scatter], [X], [Y], [idx])))
    unique = _model([helper.make_node("Unique", ["x"], ["y"])], [X], [Y])
    assert any("no importer for Unique" in p for p in tensorrt_problems(unique))
    custom = _model([helper.make_node("kcenter", ["x"], ["y"], domain="tpc")], [X], [Y])
    assert any("domain 'tpc'" in p for p in tensorrt_problems(custom))
    assert any("opset 21" in p for p in tensorrt_problems(_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], opset=21)))


def test_loop_bodies_are_checked():
    body = helper.make_graph([helper.make_node("Unique", ["s"], ["s_out"]), helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [helper.make_tensor_value_info("t", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)
    n = numpy_helper.from_array(np.array(3, dtype=np.int64), "n")
    problems = tensorrt_problems(_model([loop], [X], [Y], [n]))
    assert any("Loop node" in p and "Unique" in p for p in problems)


@pytest.mark.slow
def test_an_engine_compile_refuses_what_the_parser_would_refuse():
    """A real compile whose top-k keeps more than TensorRT's TopK takes (K <= 3840) is refused before any build."""
    factory, _, _, _ = TEST_MODELS["transformer_encoder"]
    x = torch.randn(2, 3900, 8, generator=torch.Generator().manual_seed(0))
    pm = tpc.compile(factory(), (x,), method="topk-cls", layers=[0], keep=3850)
    with pytest.raises(tpc.TpcError, match=r"TensorRT's ONNX parser would refuse this model: .*3840"):
        engine_onnx(pm.graph_module, (x,))
