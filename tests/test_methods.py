"""The seed papers' algorithms (tpc.methods) against slow loop references written here,
on random inputs, with ties and the k = prefix-only / k = N edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from tpc.methods import divprune, kcenter, tome, zero_tprune

G = torch.Generator()


@pytest.fixture(autouse=True)
def _same_inputs_whatever_ran_before():
    """Each test draws its inputs from a generator seeded afresh: results do not depend on test order."""
    G.manual_seed(0)


def cos_dist_slow(x):
    n = x.shape[0]
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            a, b = x[i].double(), x[j].double()
            d[i][j] = 1.0 - float(a @ b) / max(1e-12, float(a.norm()) * float(b.norm()))
    return d


def greedy_slow(d, chosen, candidates, count):
    chosen = list(chosen)
    picks = []
    for _ in range(count):
        best, best_j = -math.inf, None
        for j in candidates:
            if j in chosen or j in picks:
                continue
            near = min(d[j][c] for c in chosen + picks) if chosen + picks else math.inf
            if near > best + 1e-9:
                best, best_j = near, j
        picks.append(best_j)
    return picks


@pytest.mark.parametrize("k, prefix", [(3, 1), (0, 1), (9, 1), (4, 0), (10, 0), (2, 2)])
def test_kcenter(k, prefix):
    x = torch.randn(2, 10, 5, generator=G)
    got = kcenter.kcenter(x, k, prefix)
    for b in range(2):
        d = cos_dist_slow(x[b])
        if prefix:
            picks = greedy_slow(d, list(range(prefix)), range(prefix, 10), k)
        else:
            mean = x[b].double().mean(0)
            far = [1 - float(mean @ x[b, j].double()) / (float(mean.norm()) * float(x[b, j].double().norm())) for j in range(10)]
            first = max(range(10), key=lambda j: (far[j], -j))
            picks = ([first] + greedy_slow(d, [first], range(10), k - 1))[:k] if k else []
        assert got[b].tolist() == list(range(prefix)) + sorted(picks)


@pytest.mark.parametrize("k, prefix", [(3, 1), (0, 1), (9, 1), (4, 0), (10, 0)])
def test_divprune(k, prefix):
    x = torch.randn(2, 10, 5, generator=G)
    got = divprune.divprune(x, k, prefix)
    for b in range(2):
        d = cos_dist_slow(x[b, prefix:])
        m = 10 - prefix
        picks = []
        if k:
            nn = [min(d[i][j] for j in range(m) if j != i) for i in range(m)]
            first = max(range(m), key=lambda i: (nn[i], -i))
            picks = [first] + greedy_slow(d, [first], range(m), k - 1)
        assert got[b].tolist() == list(range(prefix)) + sorted(p + prefix for p in picks)


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


def wpr_slow(attn, iterations, v_min, v_max, keep=None):
    b, h, n, _ = attn.shape
    out = torch.empty(b, n, dtype=torch.float64)
    for bi in range(b):
        kp = [True] * n if keep is None else keep[bi].tolist()
        per_head = []
        for hi in range(h):
            a = [[float(attn[bi, hi, i, j]) if kp[i] and kp[j] else 0.0 for j in range(n)] for i in range(n)]
            a = [[v / max(1e-12, sum(row)) for v in row] for row in a]
            s = [1.0 if kp[j] else 0.0 for j in range(n)]
            for _ in range(iterations):
                s = [sum(s[i] * a[i][j] for i in range(n)) for j in range(n)]
            per_head.append(s)
        count = sum(kp)
        var = []
        for s in per_head:
            mean = sum(s[j] for j in range(n) if kp[j]) / count
            var.append(sum((s[j] - mean) ** 2 for j in range(n) if kp[j]) / count)
        use = [v_min <= v <= v_max for v in var]
        if not any(use):
            use = [True] * h
        for j in range(n):
            out[bi, j] = math.sqrt(sum(per_head[hi][j] ** 2 for hi in range(h) if use[hi]) / sum(use)) if kp[j] else -math.inf
    return out


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
    for b in range(2):
        rest = list(range(1, 10))
        if partition == "sequential":
            order = sorted(rest, key=lambda j: (float(imp[b, j]), j))
            group_a, group_b = order[:4], order[4:]
        else:
            group_a, group_b = rest[1::2][:4], rest[0::2] + rest[1::2][4:]
        d = cos_dist_slow(keys[b])
        best = [max(1 - d[a][j] for j in group_b) for a in group_a]
        ranked = sorted(range(len(group_a)), key=lambda i: (-best[i], i))[: min(drop, 4)]
        dropped = {group_a[i] for i in ranked}
        assert {j for j in range(10) if not got[b, j]} == dropped
        assert got[b, 0]


def test_tome_prefix_tokens_never_merge_or_receive():
    keys = torch.zeros(1, 6, 2)
    keys[..., 0] = 1.0  # every token identical: every pair ties
    kept, assign = tome.bipartite_match(keys, 2, 2)
    assert kept[0, :2].tolist() == [0, 1]
    assert assign[0, 0] == 0 and assign[0, 1] == 1 and (assign[0, 2:] >= 2).all()
