"""tome reproduces ToMe: its matching, merge and token order (against a slow reference written
from the paper in tests/reference.py), r in every form ToMe takes, clamped per layer as ToMe
clamps it, and merging at every layer by default."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

import tpc
from models import image_inputs, sharpen, tiny_timm_vit
from reference import R, eager_timm_vit, tome_merge_slow
from tpc.methods import tome
from tpc.schedule import parse_removals


G = torch.Generator().manual_seed(15)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("n", [9, 10])
def test_matching_merge_and_order_follow_tome(prefix, n):
    keys = torch.randn(2, n, 4, generator=G)
    x = torch.randn(2, n, 3, generator=G)
    sizes = torch.rand(2, n, generator=G) + 0.5
    for r in range(tome.max_merges(n, prefix) + 1):
        index, assign = tome.bipartite_match(keys, r, prefix)
        merged, total = tome.merge_tokens(x, sizes, assign, n - r)
        want, want_sizes, positions = tome_merge_slow(keys, x, sizes, r, prefix)
        assert torch.equal(index, positions), (r, index, positions)
        torch.testing.assert_close(merged.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(total.double(), want_sizes, atol=1e-5, rtol=1e-5)


def _distilled():
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=5)
    return sharpen(VisionTransformerDistilled(**args))


MODELS = {  # name -> (factory, prefix tokens, r in one of ToMe's forms)
    "cls": (tiny_timm_vit, 1, 3),
    "layerscale": (lambda: tiny_timm_vit(init_values=0.5), 1, [3, 3, 8, 8]),
    "no_cls": (lambda: tiny_timm_vit(class_token=False, global_pool="avg"), 0, (4, -0.5)),
    "distilled": (_distilled, 2, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_by_default_matches_tome(name):
    """r at every layer, clamped per layer as ToMe clamps it: tokens per layer and logits as
    ToMe's algorithm gives them (several merges in a row: the token order matters)."""
    factory, prefix, r = MODELS[name]
    model = factory()
    pm = tpc.compile(model, image_inputs(2), method="tome", r=r)
    assert pm.report.prefix == prefix and pm.report.layers == [0, 1, 2, 3]
    asked = parse_removals(r, 4)
    tokens = [pm.report.sites[0].tokens]
    for want_r in asked[:3]:
        tokens.append(tokens[-1] - min(want_r, (tokens[-1] - prefix) // 2))
    assert [s.tokens for s in pm.report.sites] == tokens
    assert [s.r_asked for s in pm.report.sites] == asked
    assert [s.r for s in pm.report.sites] == [min(a, (n - prefix) // 2) for a, n in zip(asked, tokens)]
    x = image_inputs(3, seed=4)[0]
    want = eager_timm_vit(model, x, {i: R(v) for i, v in enumerate(asked)}, method="tome", prefix=prefix)
    torch.testing.assert_close(pm(x), want, atol=1e-4, rtol=1e-4)


def test_clamped_r_is_in_the_report():
    pm = tpc.compile(tiny_timm_vit(depth=3), image_inputs(2), method="tome", r=[8, 8])
    assert [(s.tokens, s.kept, s.r_asked, s.r) for s in pm.report.sites] == [
        (17, 9, 8, 8), (9, 5, 8, 4), (5, None, 0, 0)]  # the list is padded with 0, as in ToMe
    table = pm.report.table().splitlines()
    assert table[2].endswith("tome: 9 -> 5 (r 8 clamped to 4)") and table[3].endswith(" 5  ")
    assert "r clamped at 1 layer(s)" in pm.report.summary()


def test_r_forms_as_tome_takes_them():
    # ToMe's parse_r(12, (16, -0.5)): from int(16 * 1.5) = 24 down to 2 * 16 - 24 = 8 in 11 equal steps
    assert parse_removals((16, -0.5), 12) == [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]
    assert parse_removals("(16,-0.5)", 12) == parse_removals((16, -0.5), 12)
    assert parse_removals((4, 0.0), 3) == [4, 4, 4] == parse_removals("4", 3) == parse_removals(4, 3)
    assert parse_removals((2, 1.0), 3) == [0, 2, 4]
    assert parse_removals("8,4", 4, pad=True) == [8, 4, 0, 0] == parse_removals([8, 4], 4, pad=True)
    assert parse_removals("[8]", 1) == [8]
    with pytest.raises(tpc.TpcError, match="--r has 2 values for 4 pruning layers"):
        parse_removals([8, 4], 4)
    for bad in ("(16)", "16,x", (16, 0.5, 1), -1, [4, -2], "(16,-0.5", ()):
        with pytest.raises(tpc.TpcError):
            parse_removals(bad, 3)


def test_malformed_r_strings_and_non_finite_inflections_are_refused_in_one_line():
    for bad in ("16,,8", "(16,", "[16", "16]", "16,", "(16,nan)", "(16,inf)", (16, float("nan")), (16, float("inf"))):
        with pytest.raises(tpc.TpcError, match="--r takes|schedule") as err:
            parse_removals(bad, 3)
        assert "\n" not in str(err.value)
    assert parse_removals("[16, 8, 4]", 3) == [16, 8, 4] == parse_removals(" 16 , 8 , 4 ", 3)


@pytest.mark.slow
def test_a_schedule_on_named_layers_spans_those_layers():
    # ToMe's (2, -1) over two layers: 4, then 0 (no merge at layer 2)
    pm = tpc.compile(tiny_timm_vit(depth=3), image_inputs(2), method="tome", layers=[1, 2], r=(2, -1.0))
    assert [(s.tokens, s.kept, s.r) for s in pm.report.sites] == [(17, None, None), (17, 13, 4), (13, None, 0)]


def test_other_methods_still_need_layers():
    with pytest.raises(tpc.TpcError, match="no pruning layers given"):
        tpc.compile(tiny_timm_vit(), image_inputs(2), method="topk-cls", keep=0.5)


def test_the_bipartite_matching_is_counted_as_scoring_flops():
    """ToMe's scores are the A·Bᵀ cosine similarities of the head-mean keys: ceil(N/2)·floor(N/2)·d
    multiply-adds per merging layer at batch 1 (d the head width: 99·98·64 ≈ 0.62 M on DeiT-T), not 0."""
    pruned = tpc.compile(tiny_timm_vit(), image_inputs(), method="tome", layers=[0, 2], r=2)
    vit = tiny_timm_vit()
    width = vit.embed_dim // vit.blocks[0].attn.num_heads
    tokens = [s.tokens for s in pruned.report.sites if s.r]
    assert tokens == [17, 15]
    assert pruned.report.flops_scoring == sum(((n + 1) // 2) * (n // 2) * width for n in tokens)
    assert tpc.compile(tiny_timm_vit(), image_inputs(), method="tome", layers=[0], r=0).report.flops_scoring == 0
