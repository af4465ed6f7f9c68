"""Determinism and safety: byte-identical artifacts, the user's module untouched, what tpc
says about training mode and trainable parameters."""

from __future__ import annotations

import pytest
import torch

import tpc
from models import TEST_MODELS


@pytest.mark.slow
def test_the_same_inputs_give_byte_identical_onnx(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    for i in range(2):
        pm = tpc.compile(factory(), inputs(2), method="zero-tprune", layers=[1, 2], keep=0.5)
        tpc.export(pm, tmp_path / f"{i}.onnx", check=False)  # the check runs the file; it cannot change its bytes
    assert (tmp_path / "0.onnx").read_bytes() == (tmp_path / "1.onnx").read_bytes()


@pytest.mark.slow
def test_training_mode_and_requires_grad_are_handled_and_said():
    factory, inputs, _, _ = TEST_MODELS["handwritten_vit"]
    model = factory().train()
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = tpc.compile(model, inputs(2), layers=[1], keep=0.5)
    assert any("training mode" in n for n in pm.report.notes) and any("inference" in n for n in pm.report.notes)
    assert "training mode" in pm.report.summary()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = pm(*inputs(3, seed=4))
    assert not out.requires_grad
    model.eval()
    twin = tpc.compile(model, inputs(2), layers=[1], keep=1.0)
    torch.testing.assert_close(twin(*inputs(3, seed=4)), model(*inputs(3, seed=4)).detach(), atol=1e-5, rtol=1e-5)


def test_eval_mode_model_without_grads_gets_no_notes():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    model = factory().requires_grad_(False)
    assert tpc.compile(model, inputs(2), layers=[1], keep=0.5).report.notes == []
