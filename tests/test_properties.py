"""Property tests: random small transformers and random pruning schedules.

For every drawn configuration the pipeline either raises TpcError (a deliberate refusal), or
returns a module whose keep=1.0 twin reproduces the original and whose pruned outputs match a
direct eager forward that prunes the same way. Never a wrong graph, never a crash: a bug inside
a pass is a TpcInternalError, which fails the test. Most drawn cases must compile and verify,
so a pipeline that refused everything would fail too.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import pytest
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tpc
from models import sharpen
from reference import ratio_kept, select_slow
from tpc.methods import baseline


FEATURES = 6


class Block(nn.Module):
    def __init__(self, dim, heads, pre_norm, sdpa):
        super().__init__()
        self.heads, self.pre_norm, self.sdpa = heads, pre_norm, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def qk_attend(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1) @ v
        return q, k, self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attn_residual(self, x):
        q, k, out = self.qk_attend(self.ln1(x) if self.pre_norm else x)
        return q, k, x + out

    def finish(self, h):
        if self.pre_norm:
            return h + self.mlp(self.ln2(h))
        h = self.ln1(h)
        return self.ln2(h + self.mlp(h))

    def forward(self, x):
        return self.finish(self.attn_residual(x)[2])


class Net(nn.Module):
    def __init__(self, depth, heads, head_dim, prefix, patches, pre_norm, sdpa):
        super().__init__()
        dim = heads * head_dim
        self.prefix_count = prefix
        self.embed = nn.Linear(FEATURES, dim)
        self.prefix = nn.Parameter(torch.zeros(1, prefix, dim))
        self.pos = nn.Parameter(torch.zeros(1, prefix + patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, pre_norm, sdpa) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def tokens(self, x):
        x = self.embed(x)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], 1) if self.prefix_count else x
        return x + self.pos

    def pool(self, x):
        return self.head(x[:, 0] if self.prefix_count else x.mean(1))

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.pool(x)


@torch.no_grad()
def eager(net: Net, x, schedule: dict, method: str):
    h = net.tokens(x)
    p = net.prefix_count
    for i, blk in enumerate(net.blocks):
        q, k, h = blk.attn_residual(h)
        if i in schedule:
            n = h.shape[1]
            keep = schedule[i]
            kept = ratio_kept(keep, n - p) if isinstance(keep, float) else keep
            if method == "random":
                scores = baseline.hash_scores(h.shape[0], n, i)
            else:
                scores = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), -1).mean(1)[:, 0]
            idx = select_slow(scores, kept, p)
            h = torch.stack([h[b, idx[b]] for b in range(h.shape[0])])
        h = blk.finish(h)
    return net.pool(h)


@st.composite
def cases(draw):
    depth = draw(st.integers(2, 3))  # two layers at least, so that most cases prune twice
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    prefix = draw(st.integers(0, 2))
    patches = draw(st.integers(3, 10))
    net = dict(depth=depth, heads=heads, head_dim=head_dim, prefix=prefix, patches=patches,
               pre_norm=draw(st.booleans()), sdpa=draw(st.booleans()))
    layers = sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1)))
    if len(layers) == 1 and draw(st.booleans()):
        layers = list(range(depth))
    keeps = [draw(st.one_of(st.floats(0.2, 1.0), st.integers(1, patches))) for _ in layers]
    method = draw(st.sampled_from(["random", "topk-cls"]))
    return net, dict(zip(layers, keeps)), method, draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


def check_case(case) -> str:
    """'verified' or 'refused'; raises on a wrong graph or an internal error."""
    spec, schedule, method, batch, seed = case
    torch.manual_seed(seed)
    net = sharpen(Net(**spec), seed)
    example = (torch.randn(2, spec["patches"], FEATURES, generator=torch.Generator().manual_seed(seed)),)
    x = torch.randn(batch, spec["patches"], FEATURES, generator=torch.Generator().manual_seed(seed + 1))
    layers = sorted(schedule)
    try:
        pm = tpc.compile(net, example, method=method, layers=layers, keep=[schedule[i] for i in layers])
        twin = tpc.compile(net, example, method=method, layers=layers, keep=1.0)
    except tpc.TpcError:
        return "refused"
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pm(x), eager(net, x, schedule, method), atol=1e-5, rtol=1e-5)
    return "verified"


MIN_VERIFIED = 0.7  # share of drawn cases that must compile and verify (about 0.83 is usual; refusals are the rest)

# 20 cases (each two compiles, most pruning at two or three layers) keep the test near 20 seconds on
# 2 cores. The draws are
# derandomized and no example database is read or written: every run checks the same cases, so the
# share of verified cases cannot flake in CI. Widen the search locally with a larger max_examples.
DRAWS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow  # 20 drawn models, each captured: test_pipeline's fast cases cover the pipeline on every edit
def test_pipeline_is_right_or_refuses():
    outcomes: Counter = Counter()

    @DRAWS
    @given(cases())
    def run(case):
        outcomes[check_case(case)] += 1

    run()
    assert outcomes["verified"] >= MIN_VERIFIED * sum(outcomes.values()), outcomes


def test_the_drawn_cases_are_the_same_on_every_run():
    def draw_all():
        drawn = []

        @DRAWS
        @given(cases())
        def run(case):
            drawn.append(repr(case))

        run()
        return drawn

    first = draw_all()
    assert len(set(first)) > 15 and draw_all() == first


def test_a_crashing_pass_fails_the_property_check(monkeypatch):
    def crash(*args):
        raise KeyError("a bug")

    monkeypatch.setattr("tpc.passes.insert_prune.propagate", crash)
    case = (dict(depth=2, heads=2, head_dim=4, prefix=1, patches=6, pre_norm=True, sdpa=True), {0: 3}, "topk-cls", 2, 0)
    with pytest.raises(tpc.TpcInternalError, match="internal error in pass insert_prune"):
        check_case(case)

