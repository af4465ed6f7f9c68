"""Each tpc:: op against a slow reference, plus its fake (shape) implementation."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tpc  # noqa: F401
from reference import cls_attention_slow, gather_slow, select_slow

ops = torch.ops.tpc


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_cls_attention_matches_loops(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 1, 7, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 7, 7, generator=g)
    got = ops.cls_attention(q, k, 0.5, mask)
    want = cls_attention_slow(q, k, 0.5, mask)
    assert got.dtype == torch.float32 and got.shape == (2, 7)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    if mask_kind == "bool":
        assert torch.all(got[~mask[:, 0, 0]] == 0)


@pytest.mark.parametrize("k, prefix", [(3, 1), (0, 1), (6, 1), (2, 0), (7, 0), (0, 2), (5, 2)])
def test_select_topk_matches_loops(k, prefix):
    g = torch.Generator().manual_seed(k + 10 * prefix)
    scores = torch.randn(3, 7, generator=g)
    got = ops.select_topk(scores, k, prefix)
    assert got.dtype == torch.int64 and got.shape == (3, prefix + k)
    assert torch.equal(got, select_slow(scores, k, prefix))


def test_select_topk_ties_go_to_lower_index():
    scores = torch.tensor([[9.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    assert ops.select_topk(scores, 2, 1).tolist() == [[0, 1, 2]]
    assert torch.equal(ops.select_topk(scores, 3, 1), select_slow(scores, 3, 1))


@pytest.mark.parametrize("shape, index_batch", [((2, 6, 5), 2), ((1, 6, 3, 4), 3), ((2, 6), 2)])
def test_gather_tokens_matches_loops(shape, index_batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    index = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(index_batch)])
    got = ops.gather_tokens(x, index)
    assert got.shape == (index_batch, 4, *shape[2:])
    assert torch.equal(got, gather_slow(x, index))


def test_random_scores_keep_the_random_contract():
    """What the random method promises, not its formula: a pure function of (example, token,
    seed) that ignores the tokens' content, differs by seed and example, and is uniform on [0, 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 500, 3, generator=g)
    got = ops.random_scores(x, 7)
    assert got.shape == (4, 500) and got.dtype == torch.float32
    assert torch.equal(got, ops.random_scores(torch.zeros(4, 500, 3), 7))  # content-blind, deterministic
    assert torch.equal(got[:2, :9], ops.random_scores(x[:2, :9], 7))  # the same token draws the same score
    assert torch.all((got >= 0) & (got < 1))
    other_seed = ops.random_scores(x, 8)
    assert (got != other_seed).float().mean() > 0.95 and (got[0] != got[1]).float().mean() > 0.95
    # uniform: each tenth of [0, 1) holds about a tenth of 2000 scores (chi-square, 9 degrees of freedom, p > 0.001)
    counts = torch.histc(got.flatten().double(), bins=10, min=0, max=1)
    assert float(((counts - 200) ** 2 / 200).sum()) < 27.9
    # independent of position: neighbouring tokens' scores are uncorrelated
    a, b = got[:, :-1].flatten().double(), got[:, 1:].flatten().double()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1
    # the keep count: a random selection keeps the prefix and exactly k others, different per seed
    kept = [ops.select_topk(ops.random_scores(x[:, :20], seed), 6, 1) for seed in range(5)]
    assert all(k.shape == (4, 7) and bool((k[:, 0] == 0).all()) for k in kept)
    assert len({tuple(k[0].tolist()) for k in kept}) > 1


def sparse_attention_slow(q, k, v, index, scale):
    """Per example, head and query: softmax over the indexed keys, then the weighted sum of values."""
    b, h, m, d = q.shape
    keys = list(range(k.shape[2])) if index is None else None
    out = torch.zeros(b, h, m, d, dtype=torch.float64)
    mass = torch.zeros(b, h, len(keys) if keys else index.shape[1], dtype=torch.float64)
    for e in range(b):
        rows = keys if keys else index[e].tolist()
        for head in range(h):
            for i in range(m):
                logits = [float(q[e, head, i].double() @ k[e, head, j].double()) * scale for j in rows]
                top = max(logits)
                weights = [torch.exp(torch.tensor(x - top, dtype=torch.float64)) for x in logits]
                total = sum(weights)
                for slot, (j, w) in enumerate(zip(rows, weights)):
                    out[e, head, i] += (w / total) * v[e, head, j].double()
                    mass[e, head, slot] += w / total
    return out, mass


@pytest.mark.parametrize("indexed", [True, False])
def test_sparse_attention_matches_loops(indexed):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 4, generator=g)
    k, v = torch.randn(2, 3, 8, 4, generator=g), torch.randn(2, 3, 8, 4, generator=g)
    index = torch.tensor([[0, 2, 7], [1, 3, 4]]) if indexed else None
    out, mass = ops.sparse_attention(q, k, v, index, 0.7)
    want, want_mass = sparse_attention_slow(q, k, v, index, 0.7)
    assert out.shape == (2, 3, 5, 4) and mass.shape == (2, 3, 3 if indexed else 8) and mass.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.double(), want_mass, atol=1e-6, rtol=1e-5)


def test_fake_implementations_give_the_reference_shapes():
    with FakeTensorMode():
        q = torch.empty(2, 3, 7, 4)
        assert ops.cls_attention(q, q, 0.5, None).shape == (2, 7)
        s = torch.empty(2, 7)
        idx = ops.select_topk(s, 3, 1)
        assert idx.shape == (2, 4) and idx.dtype == torch.int64
        assert ops.gather_tokens(torch.empty(1, 7, 5), idx).shape == (2, 4, 5)
        assert ops.random_scores(torch.empty(2, 7, 5), 0).shape == (2, 7)
        kv = torch.empty(2, 3, 9, 4)
        assert [t.shape for t in ops.sparse_attention(q, kv, kv, idx, 0.5)] == [(2, 3, 7, 4), (2, 3, 4)]
        assert [t.shape for t in ops.sparse_attention(q, kv, kv, None, 0.5)] == [(2, 3, 7, 4), (2, 3, 9)]


@pytest.mark.parametrize("name", ["cls_attention", "select_topk", "gather_tokens", "random_scores", "sparse_attention"])
def test_opcheck(name):
    g = torch.Generator().manual_seed(2)
    args = {
        "cls_attention": (torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g), 0.5, None),
        "select_topk": (torch.randn(2, 5, generator=g), 2, 1),
        "gather_tokens": (torch.randn(2, 5, 3, generator=g), torch.tensor([[0, 2], [1, 4]])),
        "random_scores": (torch.randn(2, 5, 3, generator=g), 3),
        "sparse_attention": (torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g),
                             torch.randn(2, 2, 5, 4, generator=g), None, 0.5),
    }[name]
    torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor"))


def test_vlm_ops_match_loops_and_their_fakes():
    """tpc::visual_index, last_token_attention (grouped keys, a bool mask, left padding), keep_visual
    and gather_axis (a batch-1 side tensor) against loops written from their docstrings; opcheck of
    each one's schema and fake implementation."""
    import math

    import tpc.vlm.ops  # noqa: F401  registers the VLM ops

    g = torch.Generator().manual_seed(3)
    b, s, heads, kv_heads, d, count = 2, 9, 4, 2, 5, 4
    visual = torch.zeros(b, s, dtype=torch.bool)
    visual[0, 2:6], visual[1, [1, 3, 4, 7]] = True, True
    pos = ops.visual_index(visual, count)
    assert pos.tolist() == [[i for i in range(s) if visual[e, i]] for e in range(b)]

    q, k = torch.randn(b, heads, s, d, generator=g), torch.randn(b, kv_heads, s, d, generator=g)
    valid = torch.ones(b, s, dtype=torch.long)
    valid[1, -2:] = 0  # the second prompt's last real token is at s - 3
    mask = torch.rand(b, 1, s, s, generator=g) > 0.3
    mask |= torch.eye(s, dtype=torch.bool)
    got = ops.last_token_attention(q, k, 0.5, mask, valid)
    want = torch.zeros(b, s)
    for e in range(b):
        last = max(i for i in range(s) if valid[e, i])
        for h in range(heads):
            keys = [j for j in range(s) if j <= last and mask[e, 0, last, j]]
            logits = [0.5 * float(q[e, h, last] @ k[e, h // (heads // kv_heads), j]) for j in keys]
            total = sum(math.exp(x) for x in logits)
            for j, x in zip(keys, logits):
                want[e, j] += math.exp(x) / total / heads
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    chosen = torch.tensor([[3, 0], [1, 2]])
    kept = ops.keep_visual(pos, chosen, s)
    assert kept.tolist() == [sorted(set(range(s)) - set(pos[e].tolist()) | {int(pos[e, c]) for c in chosen[e]})
                             for e in range(b)]
    shared = torch.randn(1, s, 3, generator=g)  # one row for every example, as rotary cos/sin
    gathered = ops.gather_axis(shared, kept, 1)
    assert torch.equal(gathered, torch.stack([shared[0, kept[e]] for e in range(b)]))

    for op, args in ((ops.visual_index, (visual, count)), (ops.last_token_attention, (q, k, 0.5, mask, valid)),
                     (ops.last_token_attention, (q, k, 0.5, None, None)), (ops.keep_visual, (pos, chosen, s)),
                     (ops.gather_axis, (shared, kept, 1))):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
