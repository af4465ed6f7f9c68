"""Graph analysis: attention sites, the residual stream, prefix tokens, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tpc
from models import TEST_MODELS, EncoderClassifier, sharpen
from specs import ENCODER_METHODS
from tpc.capture import capture
from tpc.flops import count_flops
from tpc.graph import count_prefix_tokens, find_attention_sites, find_stream_point
from tpc.passes import Role


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("timm_vit", "sdpa"), ("handwritten_vit", "explicit"), ("transformer_encoder", "sdpa")])
def test_sites_and_prefix(name, kind):
    factory, inputs, depth, prefix = TEST_MODELS[name]
    gm = capture(factory(), inputs(2))
    sites = find_attention_sites(gm)
    assert [s.layer for s in sites] == list(range(depth))
    assert {s.kind for s in sites} == {kind}
    heads = {"timm_vit": 2, "handwritten_vit": 2, "transformer_encoder": 4}[name]
    assert all(s.heads == heads and s.self_attention for s in sites)
    assert all(math.isclose(s.scale, 1 / math.sqrt(s.head_dim)) for s in sites)
    point = find_stream_point(gm, sites[0])
    assert point.token_dim == 1 and point.batch_dim == 0 and point.channels == 32
    assert count_prefix_tokens(point.skip, point)[0] == prefix


@pytest.mark.slow
def test_module_paths_name_the_attention_modules():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    sites = find_attention_sites(capture(factory(), inputs(2)))
    assert [s.module for s in sites] == [f"blocks.{i}.attn" for i in range(4)]


class SeqFirst(EncoderClassifier):
    """The same encoder run sequence-first: the stream is [N, B, C]."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1).transpose(0, 1)
        return self.head(self.encoder(x)[0])


@pytest.mark.slow
def test_sequence_first_stream_is_pruned_through_a_permute():
    model = sharpen(SeqFirst())
    x = torch.randn(3, 16, 8)
    gm = capture(model, (x[:2],))
    point = find_stream_point(gm, find_attention_sites(gm)[0])
    assert (point.token_dim, point.batch_dim) == (0, 1)
    full = tpc.compile(model, (x[:2],), layers=[0, 1], keep=1.0)
    torch.testing.assert_close(full(x), model(x), atol=1e-5, rtol=1e-5)
    pruned = tpc.compile(model, (x[:2],), layers=[0, 1], keep=0.5)
    assert [s.tokens for s in pruned.report.sites] == [17, 9, 5]
    assert pruned(x).shape == (3, 5)


def test_block_insertion_point_is_the_mlp_residual():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    gm = capture(factory(), inputs(2))
    site = find_attention_sites(gm)[1]
    attn, block = find_stream_point(gm, site, "attention"), find_stream_point(gm, site, "block")
    assert attn.node is not block.node and attn.node in block.node.args


def test_a_cnn_has_no_attention():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(tpc.TpcError, match="no attention layers"):
        tpc.compile(model, (torch.randn(2, 3, 32, 32),), layers=[0])


def test_flops_of_a_linear_and_an_attention():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 16)

        def forward(self, x):
            q = self.lin(x).view(x.shape[0], 5, 2, 8).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    gm = capture(Tiny(), (torch.randn(2, 5, 8),))
    assert count_flops(gm).total == 5 * 8 * 16 + 2 * 5 * 5 * (8 + 8)


# The scoring MACs each method adds on the tiny timm ViT (17 tokens, 2 heads of 16) pruned after
# layer 1: topk-cls reads one [CLS] row of q·kᵀ, topk-mass takes its column sums from the layer's
# own fused attention, zero-tprune's recomputed q·kᵀ is not counted (see tpc/flops.py), and the
# rest select or merge without multiply-adds but tome, whose one selection op (the matching) scores
# the 9 even tokens' keys against the 8 odd ones' (head-mean, 16 wide).
SCORING_MACS = {"topk-cls": 2 * 17 * 16, "zero-tprune": 0, "topk-mass": 0, "kcenter": 0,
                "divprune": 0, "tome": 0, "random": 0}
SELECTION_MACS = {"tome": 9 * 8 * 16}


def _vit_macs(tokens_attention: list[int], tokens_mlp: list[int], dim=32, heads=2, hidden=64, classes=5) -> int:
    """Multiply-adds of tiny_timm_vit with these token counts per block, from its shapes alone."""
    patch_embed = 16 * dim * 3 * 8 * 8
    total = patch_embed + dim * classes  # the head reads the [CLS] token only
    for n, m in zip(tokens_attention, tokens_mlp):
        total += n * dim * 3 * dim + heads * n * n * 2 * (dim // heads) + n * dim * dim  # qkv, attention, proj
        total += m * dim * hidden * 2  # MLP
    return total


@pytest.mark.slow
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_flops_split_by_role(method):
    """Model compute is the pruned ViT's own work, whatever the method (ToMe's proportional attention
    included); the overhead is the method's scoring alone."""
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method=method, layers=[1], keep=12)
    flops = count_flops(pm.graph_module)
    model = _vit_macs([17, 17, 13, 13], [17, 13, 13, 13])
    selection = SELECTION_MACS.get(method, 0)
    assert flops.by_role == {Role.MODEL: model, Role.SCORING: SCORING_MACS[method], Role.SELECTION: selection,
                             Role.GATHER: 0}
    assert pm.report.flops_scoring == SCORING_MACS[method] + selection
    assert pm.report.flops_after == model + SCORING_MACS[method] + selection


class EinsumAttention(nn.Module):
    """Attention written with einsum: q·kᵀ as 'bhqd,bhkd->bhqk' and the output as 'bhqk,bhkd->bhqd'."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        probs = torch.einsum("bhqd,bhkd->bhqk", q, k).mul((c // self.heads) ** -0.5).softmax(-1)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v).transpose(1, 2).reshape(b, n, c)
        return x + self.proj(out)


class EinsumEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.Sequential(EinsumAttention(), EinsumAttention())

    def forward(self, x):
        return self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))[:, 0]


def test_einsum_attention_is_an_attention_site():
    torch.manual_seed(0)
    model, x = EinsumEncoder().eval(), torch.randn(3, 16, 16)
    sites = find_attention_sites(capture(model, (x[:2],)))
    assert [(s.module, s.tokens, s.heads, s.scale) for s in sites] == [(f"blocks.{i}", 17, 2, 8 ** -0.5) for i in (0, 1)]
    torch.testing.assert_close(tpc.compile(model, (x[:2],), layers=[0], keep=1.0)(x), model(x), atol=1e-5, rtol=1e-5)
    pruned = tpc.compile(model, (x[:2],), layers=[0], keep=0.5)
    assert [s.tokens for s in pruned.report.sites] == [17, 9] and pruned(x).shape == (3, 16)


class SplitClsEncoder(EinsumEncoder):
    """Splits [CLS] off the stream between blocks and joins it back (``split([1, N - 1]) + cat``)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        x = self.blocks[0](torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))
        cls, rest = x.split([1, x.shape[1] - 1], dim=1)
        return self.blocks[1](torch.cat([cls, self.norm(rest)], dim=1))[:, 0]


def test_a_cls_token_split_off_and_joined_back_is_pruned_through():
    from tpc.exports.checks import run_graph

    torch.manual_seed(0)
    model, x = SplitClsEncoder().eval(), torch.randn(3, 16, 16)
    torch.testing.assert_close(tpc.compile(model, (x[:2],), layers=[0], keep=1.0)(x), model(x), atol=1e-5, rtol=1e-5)
    pruned = tpc.compile(model, (x[:2],), layers=[0], keep=0.5)
    out, replay = run_graph(pruned.graph_module, (x,))
    kept = replay.decisions[0]
    h = model.blocks[0](torch.cat([model.cls.expand(3, -1, -1), x], dim=1))
    h = h.gather(1, kept[..., None].expand(-1, -1, 16))
    expected = model.blocks[1](torch.cat([h[:, :1], model.norm(h[:, 1:])], dim=1))[:, 0]
    assert kept.shape == (3, 9) and (kept[:, 0] == 0).all()
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
