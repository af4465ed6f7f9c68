"""ONNX lowering: standard ops only, dynamic batch, parity with the torch module (outputs and
kept indices) at batch 1 and 5 from one artifact, and atomic, checked writes."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import tpc
from lanes import first_fast
from models import TEST_MODELS, tiny_timm_vit
from specs import SPECS, parse_spec, rotated
from tpc.exports.checks import run_graph
from tpc.exports.onnx import decision_names, with_decision_outputs
from tpc.registry import Kind, get_method

STANDARD_DOMAINS = {"", "ai.onnx"}


@pytest.mark.parametrize("spec,name", first_fast(rotated(SPECS, TEST_MODELS)))
def test_onnx_runtime_parity_at_batch_1_and_5(exported, spec, name):
    _, inputs, _, _ = TEST_MODELS[name]
    method, _ = parse_spec(spec)
    pm, path, result = exported(name, spec)  # compiled at layers 0 and depth-1, keep 0.6 and 0.5
    assert result.batches == (1, 2)

    model = onnx.load(path)
    assert model.opset_import[0].version >= 18
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    probe, count = with_decision_outputs(model)
    assert count == (0 if get_method(method).kind is Kind.MERGE else 2)  # a merge decides no top-k
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):
        x = inputs(batch, seed=20 + batch)
        out, *decisions = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})
        ref, replay = run_graph(pm.graph_module, x)
        assert abs(torch.from_numpy(out) - ref[0]).max() <= 1e-4
        for got, want in zip(decisions, replay.decisions):
            assert torch.equal(torch.from_numpy(got), want)


@pytest.mark.slow
def test_ort_backend_returns_a_checked_module(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    model = factory()
    torch_module = tpc.compile(model, inputs(2), layers=[1], keep=0.5)
    ort_module = tpc.compile(model, inputs(2), layers=[1], keep=0.5, backend="onnxruntime")
    x = inputs(3, seed=5)
    torch.testing.assert_close(ort_module(*x), torch_module(*x), atol=1e-4, rtol=1e-4)
    tpc.export(ort_module, tmp_path / "ort.onnx")
    assert onnx.load(tmp_path / "ort.onnx").graph.node


@pytest.mark.slow
def test_pt2_round_trip(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["handwritten_vit"]
    pm = tpc.compile(factory(), inputs(2), layers=[1], keep=0.5)
    tpc.export(pm, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    x = inputs(4, seed=6)
    torch.testing.assert_close(loaded(*x), pm(*x))


@pytest.mark.slow
def test_decision_values_are_found_in_graph_order(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), layers=[0, 1, 2], keep=0.7)
    tpc.export(pm, tmp_path / "m.onnx")
    assert decision_names(onnx.load(tmp_path / "m.onnx")) == ["select_topk", "select_topk_1", "select_topk_2"]


class NoisyViT(nn.Module):
    """Adds fresh noise in forward: no two runtimes can agree on its output."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_timm_vit()

    def forward(self, x):
        return self.vit(x) + torch.rand_like(self.vit(x))


@pytest.mark.slow
def test_a_failed_check_writes_nothing_and_keeps_the_existing_file(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    pm = tpc.compile(NoisyViT().eval(), (x,), layers=[1], keep=0.5)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the user's file")
    with pytest.raises(tpc.TpcError, match="differ"):
        tpc.export(pm, target)
    assert target.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.slow
def test_export_replaces_an_existing_artifact_on_success(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    tpc.export(tpc.compile(factory(), inputs(2), layers=[1], keep=0.5), target)
    assert onnx.load(target).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.slow
def test_restore_mode_exports_and_matches(tmp_path):
    from test_pipeline import DenseFeatures

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(DenseFeatures(factory()).eval(), inputs(2), method="zero-tprune", layers=[1, 2], keep=0.5, restore=True)
    result = tpc.export(pm, tmp_path / "dense.onnx")
    assert result.max_abs_error <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=["CPUExecutionProvider"])
    x = inputs(4, seed=2)[0]
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == (4, 17, 32)
    torch.testing.assert_close(torch.from_numpy(out), pm(x), atol=1e-4, rtol=1e-4)


def test_near_ties_are_told_from_wrong_decisions():
    from tpc.exports.checks import near_tie

    scores = torch.tensor([[1.0, 0.50000, 0.50001, 0.1, float("-inf")]])
    ours = torch.tensor([[0, 2]])
    assert near_tie(scores, ours, torch.tensor([[0, 1]]))           # swapped within float noise
    assert not near_tie(scores, ours, torch.tensor([[0, 3]]))       # a clearly worse token
    assert not near_tie(scores, ours, torch.tensor([[0, 4]]))       # a token the method had ruled out
