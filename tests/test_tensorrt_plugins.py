"""tpc's TensorRT plugins, as far as they can be checked without TensorRT or a GPU.

- the engine's ONNX: gather_tokens and sparse_attention as plugin nodes, taken by the compatibility check, and
  (with the plugin spelled out as an ONNX function) equal to the torch graph in ONNX Runtime;
- the ahead-of-time kernels (gather, sparse attention): compiled to PTX for real GPU architectures, with exactly the
  parameters TensorRT passes (inputs, int32 scalars, outputs), accepted by ptxas;
- the plugin registrations themselves, where the ``tensorrt`` package installs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tpc
from lanes import first_fast
from models import TEST_MODELS
from specs import rotated
from tpc.exports import check_batches
from tpc.exports.onnx import check_onnx, with_plugin_references
from tpc.exports.onnx_plugins import PLUGIN_DOMAIN
from tpc.exports.tensorrt import KEPT, engine_onnx, in_precision, with_kept_outputs
from tpc.exports.tensorrt_compat import tensorrt_problems


def _plugin_nodes(model):
    return [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]


@pytest.mark.slow
# The plugin ops are gather_tokens (every method) and sparse_attention (topk-mass): one method per kind of
# selection (scores + top-k, graph scores, greedy, fused attention), each on one model in turn, keeps the run
# short; topk-mass also on the explicit attention, which keeps its own probabilities. Every method's engine
# ONNX passes the parser check in test_tensorrt_compat.py.
@pytest.mark.parametrize("method,name", first_fast(
    [*rotated(["topk-cls", "zero-tprune", "kcenter", "topk-mass"], TEST_MODELS), ("topk-mass", "handwritten_vit")]))
def test_engine_onnx_runs_the_plugin_graph_like_the_torch_graph(compiled, method, name):
    _, inputs, _, _ = TEST_MODELS[name]
    pm = compiled(name, method)  # at layers 0 and depth-1, keep 0.6 and 0.5
    model = engine_onnx(pm.graph_module, inputs(2))
    plugins = _plugin_nodes(model)
    kinds = [n.op_type for n in plugins]
    assert kinds.count("gather_tokens") >= 2
    # topk-mass scores SDPA layers with the fused attention; explicit attention keeps its own probabilities
    assert kinds.count("sparse_attention") == (2 if method == "topk-mass" and name != "handwritten_vit" else 0)
    for node in plugins:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_namespace"].s == b"tpc" and attrs["aot"].i == 1
    assert tensorrt_problems(model) == []
    result = check_onnx(with_plugin_references(model), pm.graph_module, check_batches(inputs(3)) + [inputs(5)])
    assert result.batches == (1, 3, 5)


def test_kept_indices_become_named_engine_outputs():
    factory, inputs, depth, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="topk-cls", layers=[0, 2], keep=0.5)
    model = with_kept_outputs(engine_onnx(pm.graph_module, inputs(2)))
    names = [o.name for o in model.graph.output]
    assert names[1:] == [f"{KEPT}0", f"{KEPT}1"]
    import onnxruntime as ort

    session = ort.InferenceSession(with_plugin_references(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = inputs(3)[0]
    out, kept0, kept1 = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    from tpc.exports.checks import run_graph

    ref, replay = run_graph(pm.graph_module, (x,))  # the torch graph's own decisions, not the engine's
    assert kept0.shape == (3, 1 + 8) and kept1.shape[1] < kept0.shape[1]
    assert torch.equal(torch.from_numpy(kept0), replay.decisions[0])
    assert torch.equal(torch.from_numpy(kept1), replay.decisions[1])
    torch.testing.assert_close(torch.from_numpy(out), ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_engines_are_typed_in_the_onnx_and_leave_the_users_graph_alone(precision):
    factory, inputs, depth, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="topk-cls", layers=[1], keep=0.5)
    before = {k: v.dtype for k, v in pm.graph_module.state_dict().items()}
    typed_gm, typed_inputs = in_precision(pm.graph_module, inputs(2), precision)
    model = engine_onnx(typed_gm, typed_inputs)
    elem = {"fp16": 10, "bf16": 16}[precision]  # onnx.TensorProto.FLOAT16 / BFLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == elem
    assert model.graph.output[0].type.tensor_type.elem_type == elem
    assert tensorrt_problems(model) == []
    assert {k: v.dtype for k, v in pm.graph_module.state_dict().items()} == before


@pytest.mark.slow
def test_a_plugin_node_without_its_namespace_is_refused():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="topk-cls", layers=[1], keep=0.5)
    model = engine_onnx(pm.graph_module, inputs(2))
    node = _plugin_nodes(model)[0]
    node.attribute.remove(next(a for a in node.attribute if a.name == "plugin_namespace"))
    assert any("plugin_namespace" in p for p in tensorrt_problems(model))


# The ahead-of-time kernels. Triton compiles for a named GPU architecture without a GPU.
aot = pytest.importorskip("tpc.kernels.aot")


@pytest.mark.parametrize("dtype", first_fast(["fp32", "fp16", "bf16"]))
@pytest.mark.parametrize("index_dtype", first_fast(["i32", "i64"]))
@pytest.mark.parametrize("arch", first_fast([80, 90]))
def test_gather_kernel_compiles_to_ptx_with_tensorrts_argument_layout(dtype, index_dtype, arch):
    kernel = aot.gather_ptx(dtype, index_dtype, 512, arch)
    kinds = [p.split()[1] for p in kernel.params]
    # x, index | K, C, x batch stride | out: Triton's trailing scratch pointers are cut
    assert kinds == [".u64", ".u64", ".u32", ".u32", ".u32", ".u64"]
    assert kernel.threads in (32, 64, 128, 256) and kernel.shared == 0
    assert f".target sm_{arch}" in kernel.ptx
    assert len(aot.assemble(kernel, arch)) > 1000  # ptxas takes the trimmed PTX


def test_trimming_refuses_parameters_the_body_reads():
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.b64 %rd1, [k_param_1];\n}\n"
    assert "k_param_1" not in aot.trim_params(ptx.replace("[k_param_1]", "[k_param_0]"), "k", 1).split("{")[0]
    with pytest.raises(RuntimeError, match="reads its trailing parameters"):
        aot.trim_params(ptx, "k", 1)


@pytest.mark.parametrize("dtype", first_fast(["fp32", "fp16", "bf16"]))
@pytest.mark.parametrize("head_dim", first_fast([32, 64, 80]))
def test_sparse_attention_kernel_compiles_to_ptx_with_tensorrts_argument_layout(dtype, head_dim):
    kernel = aot.sparse_attention_ptx(dtype, "i64", head_dim ** -0.5, head_dim, 90)
    kinds = [p.split()[1] for p in kernel.params]
    # q, k, v, index | H, M, N, K, D | out, mass
    assert kinds == [".u64"] * 4 + [".u32"] * 5 + [".u64"] * 2
    assert 0 < kernel.shared <= aot.SHARED_LIMIT
    assert len(aot.assemble(kernel, 90)) > 1000


def test_unknown_kernel_types_are_refused():
    with pytest.raises(ValueError, match="gather_tokens takes"):
        aot.gather_ptx("fp64", "i64", 128, 90)
    with pytest.raises(ValueError, match="sparse_attention takes"):
        aot.sparse_attention_ptx("fp16", "fp32", 0.1, 64, 90)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt is not installed here (its libraries install from pypi.nvidia.com only)")
def test_plugins_register_with_tensorrt():
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin (TensorRT 10.9+ needed)")
    import tensorrt.plugin._lib as trtp_lib

    import tpc.exports.tensorrt_plugins  # noqa: F401

    for name, inputs in (("gather_tokens", ["x", "index"]), ("sparse_attention", ["q", "k", "v", "index"])):
        plugin = trtp_lib.QDP_REGISTRY[f"tpc::{name}"]
        assert plugin.aot_impl_func is not None and plugin.impl_func is not None
        assert plugin.input_tensor_names == inputs


def test_plugin_annotations_stay_classes():
    """tensorrt.plugin validates signatures by their annotation objects; postponed (string)
    annotations would make every registration fail where TensorRT is installed."""
    import ast
    from pathlib import Path

    source = Path(tpc.__file__).parent / "exports" / "tensorrt_plugins.py"
    tree = ast.parse(source.read_text())
    futures = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not futures
    decorated = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.decorator_list]
    aot_impls = [f for f in decorated if "aot_impl" in ast.unparse(f.decorator_list[0])]
    assert len(aot_impls) == 2 and all(f.returns is not None for f in aot_impls)  # TensorRT 11 requires it
