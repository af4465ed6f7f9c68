"""Whole-pipeline numerics on the three test models: keep=1.0 reproduces the original, and a
pruned module matches an eager forward that prunes the same way without tpc."""

from __future__ import annotations

import math

import pytest
import torch

import tpc
from lanes import first_fast
from models import TEST_MODELS
from reference import EAGER
from specs import SPECS, parse_spec



@pytest.mark.parametrize("name", first_fast(TEST_MODELS))
@pytest.mark.parametrize("spec", SPECS)
def test_keep_one_reproduces_the_original(name, spec):
    factory, inputs, depth, _prefix = TEST_MODELS[name]
    model = factory()
    method, options = parse_spec(spec)
    pm = tpc.compile(model, inputs(2), method=method, layers=list(range(depth)), keep=1.0, options=options)
    for batch in (1, 2, 5):
        x = inputs(batch, seed=batch)
        with torch.no_grad():
            err = (pm(*x) - model(*x)).abs().max().item()
        assert err <= 1e-5, (name, batch, err)


@pytest.mark.parametrize("name", first_fast(TEST_MODELS))
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("schedule", first_fast([{0: 0.5}, {1: 0.7, 2: 0.5}, {0: 9, 2: 5}]))
def test_pruned_matches_eager_reference(name, spec, schedule):
    factory, inputs, _depth, prefix = TEST_MODELS[name]
    model = factory()
    method, options = parse_spec(spec)
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


def test_a_refusal_names_the_layer_s_pass_not_every_pass_before_it():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    with pytest.raises(tpc.TpcError) as err:
        tpc.compile(factory(), inputs(2), layers=[0, 1, 2], keep=[9, 8, 12])
    assert str(err.value).endswith("[in pass insert_prune(layer 2)]"), str(err.value)
    assert "propagate" not in str(err.value)


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


class DenseFeatures(torch.nn.Module):
    """Every token's final feature is the output: the shape of a segmentation or retrieval backbone."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


@pytest.mark.slow
# One scorer, one graph method, one merge: the eager side tags tokens with their position, which a
# selection that reads the features (kcenter, divprune) would see.
@pytest.mark.parametrize("method", ["topk-cls", "zero-tprune", "tome"])
def test_restore_brings_back_every_position(method):
    from reference import _prune

    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    vit = factory()
    model = DenseFeatures(vit).eval()
    plain = tpc.compile(model, inputs(2), method=method, layers=[1, 2], keep=0.5)
    assert plain(*inputs(2))[0].shape == (5, 32) and plain.report.pruned_outputs == [0]
    pm = tpc.compile(model, inputs(2), method=method, layers=[1, 2], keep=0.5, restore=True)
    x = inputs(3, seed=9)[0]
    got = pm(x)
    assert got.shape == (3, 17, 32) and pm.report.pruned_outputs == []
    # eager: prune as usual, remember each stage's full stream, then scatter the kept tokens back
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        stages, state = [], {}
        for i, blk in enumerate(vit.blocks):
            a = blk.attn
            b, n, c = h.shape
            qkv = a.qkv(blk.norm1(h)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            bias = None if "sizes" not in state else state["sizes"].log()[:, None, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            h = h + blk.ls1(a.proj(out.transpose(1, 2).reshape(b, n, c)))
            if i in (1, 2):
                full = h
                tagged = torch.cat([h, torch.arange(n).float().expand(b, n)[..., None]], -1)
                state_copy = dict(state)
                pruned = _prune(tagged, q, k, a.scale, 0.5, 1, method, i, len(vit.blocks), state_copy)
                index = pruned[..., -1].round().long() if method != "tome" else None
                h = _prune(h, q, k, a.scale, 0.5, 1, method, i, len(vit.blocks), state)
                if method == "tome":
                    from reference import tome_merge_slow
                    r = n - 1 - math.ceil(0.5 * (n - 1))
                    index = tome_merge_slow(k.mean(1), full, torch.ones(b, n), r, 1)[2]
                stages.append((full, index))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        for full, index in reversed(stages):
            h = full.scatter(1, index[..., None].expand(-1, -1, full.shape[-1]), h)
        want = vit.norm(h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_restore_and_fuse_are_refused_together():
    factory, inputs, _depth, _prefix = TEST_MODELS["timm_vit"]
    with pytest.raises(tpc.TpcError, match="restore and fuse"):
        tpc.compile(factory(), inputs(2), layers=[1], keep=0.5, restore=True, options={"fuse": True})
