"""Whole-pipeline numerics on the three test models: keep=1.0 reproduces the original, and a
pruned module matches an eager forward that prunes the same way without tpc."""

from __future__ import annotations

import pytest
import torch

import tpc
from models import TEST_MODELS
from reference import EAGER


METHODS = ["topk-cls", "random", "zero-tprune", "kcenter", "divprune", "tome", "topk-cls+fuse"]


def _method(spec):
    return ("topk-cls", {"fuse": True}) if spec == "topk-cls+fuse" else (spec, None)


@pytest.mark.parametrize("name", list(TEST_MODELS))
@pytest.mark.parametrize("spec", METHODS)
def test_keep_one_reproduces_the_original(name, spec):
    factory, inputs, depth, _prefix = TEST_MODELS[name]
    model = factory()
    method, options = _method(spec)
    pm = tpc.compile(model, inputs(2), method=method, layers=list(range(depth)), keep=1.0, options=options)
    for batch in (1, 2, 5):
        x = inputs(batch, seed=batch)
        with torch.no_grad():
            err = (pm(*x) - model(*x)).abs().max().item()
        assert err <= 1e-5, (name, batch, err)


@pytest.mark.parametrize("name", list(TEST_MODELS))
@pytest.mark.parametrize("spec", METHODS)
@pytest.mark.parametrize("schedule", [{0: 0.5}, {1: 0.7, 2: 0.5}, {0: 9, 2: 5}])
def test_pruned_matches_eager_reference(name, spec, schedule):
    factory, inputs, _depth, prefix = TEST_MODELS[name]
    model = factory()
    method, options = _method(spec)
    layers = sorted(schedule)
    pm = tpc.compile(model, inputs(2), method=method, layers=layers, keep=[schedule[i] for i in layers], options=options)
    assert pm.report.prefix == prefix
    x = inputs(4, seed=3)
    with torch.no_grad():
        got = pm(*x)
    want = EAGER[name](model, *x, schedule, method=method, prefix=prefix, options=options)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tome_refuses_more_merges_than_bipartite_matching_allows():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    with pytest.raises(tpc.TpcError, match="tome can merge at most 8"):
        tpc.compile(factory(), inputs(2), method="tome", layers=[0], keep=2)


def test_r_removes_tokens_per_layer_as_in_tome():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="tome", layers=[0, 1, 2], r=4)
    assert [s.tokens for s in pm.report.sites] == [17, 13, 9, 5]


def test_tokens_per_layer_follow_the_schedule():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), layers=[0, 2], keep=[0.5, 2])
    tokens = [(s.tokens, s.kept) for s in pm.report.sites]
    assert tokens == [(17, 9), (9, None), (9, 3), (3, None)]
    assert pm.report.flops_after < pm.report.flops_before


def test_after_block_prunes_before_the_next_block():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    model = factory()
    attn = tpc.compile(model, inputs(2), layers=[1], keep=0.5)
    block = tpc.compile(model, inputs(2), layers=[1], keep=0.5, after="block")
    assert [s.tokens for s in block.report.sites] == [s.tokens for s in attn.report.sites] == [17, 17, 9, 9]
    assert block.report.flops_after > attn.report.flops_after  # block 1's MLP still sees 17 tokens


def test_compile_does_not_touch_the_users_module():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    model = factory().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tpc.compile(model, inputs(2), layers=[1], keep=0.5)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, options, words", [
    ("zero-tprune", {"iterations": -1}, "iterations"),
    ("zero-tprune", {"similarity": 2.0}, "similarity"),
    ("zero-tprune", {"partition": "x"}, "partition"),
    ("zero-tprune", {"v_min": 0.5, "v_max": 0.1}, "v_max"),
    ("topk-cls", {"fuse": "yes"}, "fuse"),
    ("kcenter", {"fuse": True}, "has no option"),
])
def test_bad_method_options(method, options, words):
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    with pytest.raises(tpc.TpcError, match=words):
        tpc.compile(factory(), inputs(2), method=method, layers=[1], keep=0.5, options=options)
