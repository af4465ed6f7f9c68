"""propagate_token_axis on small graphs built to hit one rule each: side tensors gathered
with the kept indices, token slices and pooling, and the refusals (with node and module)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpc
from models import sharpen
from reference import select_slow
from tpc.capture import capture
from tpc.methods import baseline
from tpc.passes import FuseAttentionScores, ProportionalAttention, compactions

DIM, HEADS, TOKENS = 16, 2, 9


class SdpaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Linear(DIM, DIM)

    def qkv_heads(self, x):
        b, n, _ = x.shape
        return self.qkv(self.norm(x)).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, x, mask=None, bias=None):
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if bias is not None:
            logits = q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS) + bias
            out = logits.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, DIM))

    def forward(self, x, mask=None, bias=None):
        x = x + self.attend(x, mask, bias)
        return x + self.mlp(x)


class Stack(nn.Module):
    """[CLS] + 8 tokens through 3 blocks; subclasses change one thing."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.blocks = nn.ModuleList(SdpaBlock() for _ in range(3))
        self.head = nn.Linear(DIM, 3)

    def tokens(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


def _inputs(batch=2, seed=0):
    return (torch.randn(batch, TOKENS - 1, DIM, generator=torch.Generator().manual_seed(seed)),)


def _random_index(x, layer, keep, prefix=1, valid=None):
    scores = baseline.hash_scores(x.shape[0], x.shape[1], layer)
    if valid is not None:  # the random method ranks padding below every real token
        scores = torch.where(valid, scores, torch.tensor(-1.0))
    return select_slow(scores, keep, prefix)


def _take(t, idx, dim):
    return torch.stack([t[b].index_select(dim - 1, idx[b]) for b in range(idx.shape[0])])


def _compile(model, inputs, layers, keep, **kw):
    return tpc.compile(sharpen(model), inputs, method="random", layers=layers, keep=keep, **kw)


class MaskedStack(Stack):
    def forward(self, x, valid):
        x = self.tokens(x)
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return self.head(x[:, 0])


def test_attention_mask_is_gathered_with_the_kept_tokens():
    model = sharpen(MaskedStack())
    g = torch.Generator().manual_seed(3)
    x, valid = torch.randn(3, 8, DIM, generator=g), torch.rand(3, 8, generator=g) > 0.4
    pm = tpc.compile(model, (x[:2], valid[:2]), method="random", layers=[0], keep=4)
    streams = {c.out for c in compactions(pm.graph_module)}
    side = [n for n in pm.graph_module.graph.nodes if n.target is torch.ops.tpc.gather_tokens.default and n not in streams]
    assert side, "the attention mask must be gathered with the kept tokens"

    with torch.no_grad():
        t = model.tokens(x)
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)[:, None, None, :]
        t = t + model.blocks[0].attend(t, mask)
        idx = _random_index(t, 0, 4, valid=mask[:, 0, 0])
        t = _take(t, idx, 1)
        mask = _take(mask.expand(3, 1, 1, TOKENS), idx, 3)
        t = t + model.blocks[0].mlp(t)
        for blk in model.blocks[1:]:
            t = blk(t, mask=mask)
        want = model.head(t[:, 0])
        torch.testing.assert_close(pm(x, valid), want, atol=1e-5, rtol=1e-5)


def test_padding_never_outranks_real_tokens():
    model = sharpen(MaskedStack())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 8, DIM, generator=g)
    valid = torch.zeros(4, 8, dtype=torch.bool)
    for b, n_real in enumerate([2, 5, 8, 3]):
        valid[b, :n_real] = True
    pm = tpc.compile(model, (x[:2], valid[:2]), method="topk-cls", layers=[0], keep=2)
    from tpc.exports.checks import run_graph

    _, replay = run_graph(pm.graph_module, (x, valid))
    (kept,) = replay.decisions
    assert kept.shape == (4, 3) and bool((kept[:, 0] == 0).all())  # [CLS] and the two best tokens
    for b in range(4):
        real = {0} | {j + 1 for j in range(8) if valid[b, j]}
        chosen = set(kept[b].tolist())
        assert chosen <= real or real <= chosen, (b, chosen, real)


class BiasStack(Stack):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(HEADS, TOKENS, TOKENS))

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x, bias=self.bias)
        return self.head(x[:, 0])


@pytest.mark.slow
def test_position_bias_is_gathered_along_both_token_axes():
    model = sharpen(BiasStack())
    x = _inputs(3, seed=5)[0]
    pm = _compile(model, _inputs(), [1], 5)
    with torch.no_grad():
        t = model.tokens(x)
        t = model.blocks[0](t, bias=model.bias)
        t = t + model.blocks[1].attend(t, bias=model.bias)
        idx = _random_index(t, 1, 5)
        t = _take(t, idx, 1)
        bias = model.bias.unsqueeze(0).expand(3, -1, -1, -1)
        bias = _take(_take(bias, idx, 2), idx, 3)
        t = t + model.blocks[1].mlp(t)
        t = model.blocks[2](t, bias=bias)
        torch.testing.assert_close(pm(x), model.head(t[:, 0]), atol=1e-5, rtol=1e-5)


class LongSkip(Stack):
    def forward(self, x):
        x0 = self.tokens(x)
        x = x0
        for blk in self.blocks:
            x = blk(x)
        return self.head((x + x0).mean(1))


def test_a_stale_copy_of_the_stream_is_gathered_and_mean_pooling_sees_kept_tokens():
    model = sharpen(LongSkip())
    x = _inputs(2, seed=6)[0]
    pm = _compile(model, _inputs(), [0], 3)
    with torch.no_grad():
        x0 = model.tokens(x)
        t = x0 + model.blocks[0].attend(x0)
        idx = _random_index(t, 0, 3)
        t, x0 = _take(t, idx, 1), _take(x0, idx, 1)
        t = t + model.blocks[0].mlp(t)
        for blk in model.blocks[1:]:
            t = blk(t)
        torch.testing.assert_close(pm(x), model.head((t + x0).mean(1)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_average_pool_over_patch_tokens():
    from models import tiny_timm_vit
    from reference import eager_timm_vit

    model = tiny_timm_vit(global_pool="avg")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pm = tpc.compile(model, (x[:2],), method="random", layers=[1], keep=5)
    torch.testing.assert_close(pm(x), eager_timm_vit(model, x, {1: 5}, method="random"), atol=1e-5, rtol=1e-5)


class MaxPool(Stack):
    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.max(dim=1).values)


def test_max_pooling_over_tokens_sees_the_kept_tokens():
    """``x.max(dim=1).values`` was refused as reading positions; it pools the kept tokens."""
    model = sharpen(MaxPool())
    x = _inputs(2, seed=6)[0]
    pm = _compile(model, _inputs(), [0], 3)
    with torch.no_grad():
        t = model.tokens(x)
        t = t + model.blocks[0].attend(t)
        t = _take(t, _random_index(t, 0, 3), 1)
        t = t + model.blocks[0].mlp(t)
        for blk in model.blocks[1:]:
            t = blk(t)
        torch.testing.assert_close(pm(x), model.head(t.amax(1)), atol=1e-5, rtol=1e-5)


class GridHead(Stack):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(DIM, 3, 2)

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        grid = x[:, 1:].transpose(1, 2).reshape(x.shape[0], DIM, 2, 4)
        return self.conv(grid).mean((2, 3))


class ReadsToken(Stack):
    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 3])


class AppendsToken(Stack):
    def forward(self, x):
        x = self.tokens(x)
        x = self.blocks[0](x)
        x = torch.cat([x, self.cls.expand(x.shape[0], -1, -1)], 1)
        for blk in self.blocks[1:]:
            x = blk(x)
        return self.head(x[:, 0])


@pytest.mark.parametrize("model, words", [
    (GridHead, ["reshape", "grid", "--restore"]),
    (ReadsToken, ["select", "reads token 3", "--restore"]),
    (AppendsToken, ["cat", "concatenates along the token axis", "Prune after layers 1-2 only"]),
])
def test_refusals_name_the_node_the_reason_and_the_way_out(model, words):
    with pytest.raises(tpc.TpcError) as err:
        _compile(model(), _inputs(), [0], 4)
    message = str(err.value)
    assert "cannot prune after layer 0" in message
    for w in words:
        assert w in message, message
    assert "\n" not in message


def test_grid_head_is_refused_at_every_keep_ratio_and_compiles_with_restore():
    with pytest.raises(tpc.TpcError, match="full token grid"):
        _compile(GridHead(), _inputs(), [2], 1.0)
    model = sharpen(GridHead())
    pm = tpc.compile(model, _inputs(), method="random", layers=[0, 1], keep=4, restore=True)
    x = _inputs(3, seed=4)
    assert pm(*x).shape == (3, 3)


def test_appending_a_token_after_block_0_still_lets_later_layers_prune():
    pm = _compile(AppendsToken(), _inputs(), [1], 4)
    assert [s.tokens for s in pm.report.sites] == [9, 10, 5]


@pytest.mark.parametrize("make_pass", [ProportionalAttention, FuseAttentionScores])
def test_passes_without_a_match_leave_the_graph_unchanged(make_pass):
    gm = capture(sharpen(Stack()), _inputs())
    before = gm.code
    result = make_pass()(gm)
    assert result.modified is False and gm.code == before


def _rotate(t, table):
    """Rotary embedding with a cos|sin table right-aligned to t ([N, D] or [B, 1, N, D])."""
    cos, sin = table.chunk(2, -1)
    t1, t2 = t.chunk(2, -1)
    return t * cos + torch.cat([-t2, t1], -1) * sin


class RotaryStack(Stack):
    """EVA-02's layout: q and k of the patch tokens rotated by a per-patch table, the prefix joined back."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(TOKENS - 1, 2 * (DIM // HEADS)))

    def attend(self, blk, x, table):
        b, n, _ = x.shape
        q, k, v = blk.qkv_heads(x)
        q, k = (torch.cat([t[:, :, :1], _rotate(t[:, :, 1:], table)], 2) for t in (q, k))
        return blk.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = x + self.attend(blk, x, self.table)
            x = x + blk.mlp(x)
        return self.head(x[:, 0])


@pytest.mark.slow
def test_rotary_table_of_patch_tokens_is_gathered_so_kept_tokens_keep_their_positions():
    model = sharpen(RotaryStack())
    x = _inputs(3, seed=7)[0]
    pm = _compile(model, _inputs(), [1], 4)
    with torch.no_grad():
        t = model.tokens(x)
        t = t + model.attend(model.blocks[0], t, model.table)
        t = t + model.blocks[0].mlp(t)
        t = t + model.attend(model.blocks[1], t, model.table)
        idx = _random_index(t, 1, 4)
        t = _take(t, idx, 1)
        table = torch.stack([model.table[idx[b, 1:] - 1] for b in range(3)]).unsqueeze(1)  # [B, 1, K, D]
        t = t + model.blocks[1].mlp(t)
        t = t + model.attend(model.blocks[2], t, table)
        t = t + model.blocks[2].mlp(t)
        torch.testing.assert_close(pm(x), model.head(t[:, 0]), atol=1e-5, rtol=1e-5)


class PrependsToken(Stack):
    """CaiT's layout: a class token put in front of the (pruned) tokens after block 0."""

    def forward(self, x):
        x = self.tokens(x)
        x = self.blocks[0](x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks[1:]:
            x = blk(x)
        return self.head(x[:, 0])


def test_a_token_put_in_front_after_pruning_is_carried_and_readable():
    model = sharpen(PrependsToken())
    x = _inputs(3, seed=8)[0]
    pm = _compile(model, _inputs(), [0], 4)
    assert [s.tokens for s in pm.report.sites] == [9, 6, 6]
    with torch.no_grad():
        t = model.tokens(x)
        t = t + model.blocks[0].attend(t)
        t = _take(t, _random_index(t, 0, 4), 1)
        t = t + model.blocks[0].mlp(t)
        t = torch.cat([model.cls.expand(3, -1, -1), t], 1)
        for blk in model.blocks[1:]:
            t = blk(t)
        torch.testing.assert_close(pm(x), model.head(t[:, 0]), atol=1e-5, rtol=1e-5)
