"""Every tpc:: op's ONNX translation against its reference implementation, in ONNX Runtime,
at several batch sizes (the batch dimension is dynamic in every exported graph)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from torch import nn

import tpc  # noqa: F401
from lanes import first_fast
from tpc.exports.onnx import to_onnx

ops = torch.ops.tpc


class OpModule(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _inputs(batch, seed, shapes):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "mask":
            m = torch.rand(batch, 1, 1, 9, generator=g) > 0.3
            m[..., 0] = True
            out.append(m)
        else:
            out.append(torch.randn(batch, *shape, generator=g) * 2)
    return tuple(out)


def _softmax(x):
    return x.softmax(-1)


CASES = {
    "cls_attention": (lambda q, k: ops.cls_attention(q, k, 0.5, None), [(2, 9, 4), (2, 9, 4)]),
    "cls_attention_bool_mask": (lambda q, k, m: ops.cls_attention(q, k, 0.5, m), [(2, 9, 4), (2, 9, 4), "mask"]),
    "cls_attention_additive_mask": (lambda q, k, m: ops.cls_attention(q, k, 0.5, m), [(2, 9, 4), (2, 9, 4), (1, 9, 9)]),
    "random_scores": (lambda x: ops.random_scores(x, 5), [(9, 3)]),
    "select_topk": (lambda s: ops.select_topk(s, 4, 1), [(9,)]),
    "select_topk_no_prefix": (lambda s: ops.select_topk(s, 9, 0), [(9,)]),
    "select_topk_prefix_only": (lambda s: ops.select_topk(s, 0, 2), [(9,)]),
    "select_topk_nothing": (lambda s: ops.select_topk(s, 0, 0), [(9,)]),  # ToDRE's keep 0 of a VLM's visual tokens
    "gather_tokens": (lambda x, s: ops.gather_tokens(x, ops.select_topk(s, 3, 1)), [(9, 5), (9,)]),
    "restore_tokens": (lambda x, y, s: ops.restore_tokens(x, ops.select_topk(s, 3, 1), y[:, :4]), [(9, 5), (9, 5), (9,)]),
    "fuse_tokens": (lambda x, s: ops.fuse_tokens(x, s.softmax(-1), ops.select_topk(s, 3, 1)), [(9, 5), (9,)]),
    "attention_probs": (lambda q, k, m: ops.attention_probs(q, k, 0.3, m), [(2, 9, 4), (2, 9, 4), "mask"]),
    "weighted_pagerank": (lambda a: ops.weighted_pagerank(_softmax(a), 7, 0.01, 0.7, None), [(3, 9, 9)]),
    "weighted_pagerank_one_iteration_all_heads": (lambda a: ops.weighted_pagerank(_softmax(a), 1, 100.0, 200.0, None), [(3, 9, 9)]),
    "weighted_pagerank_loop": (lambda a, s: ops.weighted_pagerank(_softmax(a), 20, 0.0, 9.0, s > -0.5), [(3, 9, 9), (9,)]),
    "weighted_pagerank_keep": (lambda a, s: ops.weighted_pagerank(_softmax(a), 5, 0.0, 9.0, s > -0.5), [(3, 9, 9), (9,)]),
    "similarity_keep_sequential": (lambda s, k: ops.similarity_keep(s, k, 3, 1, "sequential"), [(9,), (9, 4)]),
    "similarity_keep_alternate": (lambda s, k: ops.similarity_keep(s, k, 2, 1, "alternate"), [(9,), (9, 4)]),
    "kcenter": (lambda x: ops.kcenter(x, 4, 1), [(9, 5)]),
    "kcenter_no_prefix": (lambda x: ops.kcenter(x, 4, 0), [(9, 5)]),
    "kcenter_all": (lambda x: ops.kcenter(x, 8, 1), [(9, 5)]),
    "divprune": (lambda x: ops.divprune(x, 3, 1), [(9, 5)]),
    "divprune_one": (lambda x: ops.divprune(x, 1, 2), [(9, 5)]),
    "bipartite_match": (lambda k: ops.bipartite_match(k, 3, 1), [(9, 4)]),
    "bipartite_match_prefix2": (lambda k: ops.bipartite_match(k, 2, 2), [(10, 4)]),
    "bipartite_match_no_prefix": (lambda k: ops.bipartite_match(k, 4, 0), [(9, 4)]),
    "bipartite_match_nothing": (lambda k: ops.bipartite_match(k, 0, 1), [(9, 4)]),
    "merge_tokens": (lambda x, k: ops.merge_tokens(x, x[..., 0].abs() + 0.5, ops.bipartite_match(k, 3, 1)[1], 6, True), [(9, 5), (9, 4)]),
    "sparse_attention": (lambda q, k, v, s: ops.sparse_attention(q, k, v, ops.select_topk(s, 4, 1), 0.4), [(2, 9, 4), (2, 9, 4), (2, 9, 4), (9,)]),
    "sparse_attention_every_key": (lambda q, k, v: ops.sparse_attention(q, k, v, None, 0.4), [(2, 9, 4), (2, 9, 4), (2, 9, 4)]),
    "kcenter_padding": (lambda x, s: ops.kcenter(x, 5, 1, s > 0), [(9, 5), (9,)]),
    "kcenter_padding_no_prefix": (lambda x, s: ops.kcenter(x, 6, 0, s > 0), [(9, 5), (9,)]),
    "divprune_padding": (lambda x, s: ops.divprune(x, 6, 1, s > 0), [(9, 5), (9,)]),
    "kcenter_one_no_prefix": (lambda x: ops.kcenter(x, 1, 0), [(9, 5)]),
    "kcenter_duplicates": (lambda x: ops.kcenter(x[:, :1].expand(-1, 9, -1).contiguous(), 8, 1), [(9, 5)]),
    "divprune_all": (lambda x: ops.divprune(x, 8, 1), [(9, 5)]),
    "merge_tokens_sum": (lambda x, k: ops.merge_tokens(x, x[..., 0].abs(), ops.bipartite_match(k, 2, 1)[1], 7, False), [(9, 5), (9, 4)]),
}


@pytest.mark.parametrize("case", first_fast(CASES))
def test_translation_matches_reference(case):
    fn, shapes = CASES[case]
    module = OpModule(fn)
    model = to_onnx(module, _inputs(2, 0, shapes))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        xs = _inputs(batch, batch, shapes)
        want = module(*xs)
        want = want if isinstance(want, tuple) else (want,)
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})
        assert len(got) == len(want)
        for g, w in zip(got, want):
            g = torch.from_numpy(g)
            assert g.shape == w.shape and g.dtype == w.dtype, (case, g.shape, w.shape, g.dtype, w.dtype)
            if w.dtype.is_floating_point:
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, equal_nan=True)
            else:
                assert torch.equal(g, w), (case, g, w)


class VlmOps(nn.Module):
    """Every tpc:: VLM op, chained as the rewrite chains them (tpc/vlm/prune_visual.py)."""

    def forward(self, q, k, h, valid, visual):
        mask = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None] & valid.bool()[:, None, None, :]
        scores = ops.last_token_attention(q, k, 0.5, mask, valid)
        loose = ops.last_token_attention(q, k, 0.5, None, None)
        pos = ops.visual_index(visual, 5)
        chosen = ops.select_topk(ops.gather_axis(scores, pos, 1), 2, 0)
        kept = ops.keep_visual(pos, chosen, 12)
        return scores, loose, pos, kept, ops.gather_axis(h[:1], kept, 1), ops.gather_axis(mask.float(), kept, 3)


def test_vlm_translations_match_reference():
    """tpc::visual_index, last_token_attention (grouped keys, bool mask, padding), keep_visual and
    gather_axis (a batch-1 side tensor broadcast; a last axis) in ONNX Runtime."""
    from tpc.vlm.onnx_ops import ALL_TRANSLATIONS

    module = VlmOps()

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        valid = torch.ones(batch, 12, dtype=torch.long)
        valid[0, :seed % 3] = 0  # left padding in the first example
        visual = torch.zeros(batch, 12, dtype=torch.bool)
        for b in range(batch):  # 5 visual tokens per example, at example-dependent offsets
            visual[b, 3 + (b + seed) % 4:8 + (b + seed) % 4] = True
        return (torch.randn(batch, 4, 12, 8, generator=g), torch.randn(batch, 2, 12, 8, generator=g),
                torch.randn(batch, 12, 6, generator=g), valid, visual)

    example = inputs(2, 1)
    ep = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("b")},) * 5)
    model = torch.onnx.export(ep, example, dynamo=True, opset_version=18, custom_translation_table=ALL_TRANSLATIONS,
                              verbose=False, report=False).model_proto
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 2), (3, 1)):
        xs = inputs(batch, seed)
        want = module(*xs)
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})
        assert len(got) == len(want)
        for g, w in zip(got, want):
            g = torch.from_numpy(g)
            assert g.shape == w.shape and g.dtype == w.dtype
            if w.dtype.is_floating_point:
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(g, w)
