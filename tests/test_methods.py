"""The seed papers' algorithms (tpc.methods) against the slow loop references in
tests/reference.py (written from the papers), on random inputs, with ties and the
k = prefix-only / k = N edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from reference import (cos_dist_slow, divprune_slow, fuse_slow, greedy_slow, kcenter_slow, similarity_keep_slow, wpr_slow,
                       zero_tprune_iterations_slow)
from tpc.methods import divprune, evit, kcenter, tome, zero_tprune

G = torch.Generator()


@pytest.fixture(autouse=True)
def _same_inputs_whatever_ran_before():
    """Each test draws its inputs from a generator seeded afresh: results do not depend on test order."""
    G.manual_seed(0)


@pytest.mark.parametrize("k, prefix", [(3, 1), (0, 1), (9, 1), (4, 0), (10, 0), (2, 2)])
def test_kcenter(k, prefix):
    x = torch.randn(2, 10, 5, generator=G)
    assert torch.equal(kcenter.kcenter(x, k, prefix), kcenter_slow(x, k, prefix))


@pytest.mark.parametrize("k, prefix", [(3, 1), (0, 1), (9, 1), (4, 0), (10, 0)])
def test_divprune(k, prefix):
    x = torch.randn(2, 10, 5, generator=G)
    assert torch.equal(divprune.divprune(x, k, prefix), divprune_slow(x, k, prefix))


def _with_padding_slow(select, valid, prefix, k):
    """Padding is taken only when the real tokens run out, first positions first."""
    real = [j for j in range(prefix, len(valid)) if valid[j]]
    picks = select(real, min(k, len(real)))
    padding = [j for j in range(prefix, len(valid)) if not valid[j]]
    return picks + padding[:k - len(picks)]


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("prefix", [0, 1])
def test_kcenter_and_divprune_take_padding_last(k, prefix):
    x = torch.randn(2, 10, 5, generator=G)
    valid = torch.tensor([[True] * 6 + [False] * 4, [True, False] * 5])
    valid[:, :prefix] = True
    for b in range(2):
        d = cos_dist_slow(x[b])
        v = valid[b].tolist()

        def kcenter_slow(real, count):
            if prefix:
                return greedy_slow(d, list(range(prefix)), real, count)
            mean = x[b].double().mean(0)
            far = {j: 1 - float(mean @ x[b, j].double()) / (float(mean.norm()) * float(x[b, j].double().norm())) for j in real}
            first = max(real, key=lambda j: (far[j], -j))
            return ([first] + greedy_slow(d, [first], real, count - 1))[:count] if count else []

        def divprune_slow(real, count):
            if not count:
                return []
            nn = {i: min(d[i][j] for j in range(prefix, 10) if j != i) for i in real}
            first = max(real, key=lambda i: (nn[i], -i))
            return [first] + greedy_slow(d, [first], real, count - 1)

        for fn, slow in ((kcenter.kcenter, kcenter_slow), (divprune.divprune, divprune_slow)):
            got = fn(x, k, prefix, valid)[b].tolist()
            assert got == list(range(prefix)) + sorted(_with_padding_slow(slow, v, prefix, k)), fn.__name__
            flat = fn(x, k, prefix, valid[b])[b].tolist()  # a mask without batch dim broadcasts
            assert flat == got


def test_greedy_selection_with_duplicate_tokens_never_repeats():
    x = torch.ones(1, 6, 3)
    assert sorted(kcenter.kcenter(x, 5, 1)[0].tolist()) == [0, 1, 2, 3, 4, 5]
    assert sorted(divprune.divprune(x, 5, 1)[0].tolist()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("iterations, v_min, v_max, with_keep", [(1, 0.01, 0.7, False), (5, 0.0, 100.0, False), (30, 0.01, 0.7, True), (3, 50.0, 60.0, False)])
def test_weighted_pagerank(iterations, v_min, v_max, with_keep):
    logits = torch.randn(2, 3, 7, 7, generator=G) * 2
    attn = logits.softmax(-1)
    keep = (torch.rand(2, 7, generator=G) > 0.3) if with_keep else None
    if keep is not None:
        keep[:, 0] = True
    got = zero_tprune.weighted_pagerank(attn, iterations, v_min, v_max, keep)
    torch.testing.assert_close(got.double(), wpr_slow(attn, iterations, v_min, v_max, keep), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_keep", [False, True])
def test_weighted_pagerank_keeps_total_importance(with_keep):
    """A row-stochastic graph conserves Σ_j s_j (paper Eq. 2): with one head, EIR returns that head's
    scores, so the kept tokens' importance sums to their count, after any number of iterations."""
    attn = torch.randn(2, 1, 9, 9, generator=G).softmax(-1)
    keep = torch.rand(2, 9, generator=G) > 0.4 if with_keep else torch.ones(2, 9, dtype=torch.bool)
    keep[:, 0] = True
    got = zero_tprune.weighted_pagerank(attn, 10, 0.0, math.inf, keep if with_keep else None)
    torch.testing.assert_close(got.masked_fill(~keep, 0.0).sum(-1), keep.sum(-1).float())
    assert bool((got[~keep] == -math.inf).all())


@pytest.mark.parametrize("partition", ["sequential", "alternate"])
@pytest.mark.parametrize("drop", [0, 2, 4, 10])
def test_similarity_stage(partition, drop):
    imp = torch.randn(2, 10, generator=G)
    imp[0, 3] = imp[0, 5]  # a tie in importance
    keys = torch.randn(2, 10, 4, generator=G)
    keys[1, 7] = keys[1, 8]  # two identical tokens
    got = zero_tprune.similarity_keep(imp, keys, drop, 1, partition)
    assert torch.equal(got, similarity_keep_slow(imp, keys, drop, 1, partition))
    assert (~got).sum(-1).tolist() == [min(drop, 4)] * 2 and got[:, 0].all()


def test_tome_prefix_tokens_never_merge_or_receive():
    keys = torch.zeros(1, 6, 2)
    keys[..., 0] = 1.0  # every token identical: every pair ties
    kept, assign = tome.bipartite_match(keys, 2, 2)
    assert kept[0, :2].tolist() == [0, 1]
    assert assign[0, 0] == 0 and assign[0, 1] == 1 and (assign[0, 2:] >= 2).all()


def test_zero_tprune_iteration_schedule():
    for depth in range(1, 14):
        assert [zero_tprune.auto_iterations(i, depth) for i in range(depth)] == \
            [zero_tprune_iterations_slow(i, depth) for i in range(depth)], depth


def test_evit_fused_token():
    x = torch.randn(2, 8, 4, generator=G)
    scores = torch.randn(2, 8, generator=G).softmax(-1)
    idx = torch.tensor([[0, 2, 5], [0, 1, 7]])
    torch.testing.assert_close(evit.fuse_tokens(x, scores, idx), fuse_slow(x, scores, idx))
