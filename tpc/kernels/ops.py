"""Definitions of the ``tpc::`` ops: reference and fake implementations.

Shapes use B for batch, N for tokens in, K for tokens kept, P for prefix tokens, H heads,
d head width, C channels.
"""

from __future__ import annotations

import torch

from tpc.methods import baseline, divprune as divprune_method, evit, kcenter as kcenter_method, tome, zero_tprune

_LIB = "tpc"


@torch.library.custom_op(f"{_LIB}::cls_attention", mutates_args=())
def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] head-mean attention of token 0 over all tokens (q, k: [B, H, N, d])."""
    return evit.cls_attention(q, k, scale, mask)


@cls_attention.register_fake
def _(q, k, scale, mask=None):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::random_scores", mutates_args=())
def random_scores(x: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, N] seeded uniform scores for the tokens of x ([B, N, ...])."""
    return baseline.hash_scores(x.shape[0], x.shape[1], seed, x.device)


@random_scores.register_fake
def _(x, seed):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::select_topk", mutates_args=())
def select_topk(scores: torch.Tensor, k: int, num_prefix: int) -> torch.Tensor:
    """[B, P + k] int64 indices: the P prefix tokens, then the k best-scored others.

    The kept indices are sorted ascending so tokens keep their original relative order.
    Ties go to the lower index (a stable sort), as ONNX TopK resolves them.
    """
    rest = scores[:, num_prefix:]
    best = torch.sort(rest, dim=1, descending=True, stable=True).indices[:, :k]
    kept = torch.sort(best, dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device, dtype=torch.int64).expand(scores.shape[0], num_prefix)
    return torch.cat([prefix, kept], dim=1)


@select_topk.register_fake
def _(scores, k, num_prefix):
    return scores.new_empty((scores.shape[0], num_prefix + k), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x ([B or 1, N, ...]) picked by index ([B, K]): [B, K, ...].

    A batch of one in x is broadcast, so side tensors shared by every example (a position
    bias, a mask without batch) are gathered per example with the same op.
    """
    batch, kept = index.shape
    rest = x.shape[2:]
    src = x.expand(batch, *x.shape[1:])
    idx = index.reshape(batch, kept, *([1] * len(rest))).expand(batch, kept, *rest)
    return torch.gather(src, 1, idx)


@gather_tokens.register_fake
def _(x, index):
    return x.new_empty((index.shape[0], index.shape[1], *x.shape[2:]))


@torch.library.custom_op(f"{_LIB}::restore_tokens", mutates_args=())
def restore_tokens(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The full sequence again: ``base`` ([B, N, C]) with rows ``index`` ([B, K]) replaced by ``src``."""
    rows = index.unsqueeze(-1).expand(-1, -1, src.shape[-1])
    return base.expand(index.shape[0], *base.shape[1:]).scatter(1, rows, src.to(base.dtype))


@restore_tokens.register_fake
def _(base, index, src):
    return base.new_empty((index.shape[0], *base.shape[1:]))


@torch.library.custom_op(f"{_LIB}::fuse_tokens", mutates_args=())
def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, K + 1, C]: the kept rows of x, then the dropped rows summed with weights ``scores`` (EViT)."""
    return evit.fuse_tokens(x, scores, index)


@fuse_tokens.register_fake
def _(x, scores, index):
    return x.new_empty((index.shape[0], index.shape[1] + 1, x.shape[2]))


@torch.library.custom_op(f"{_LIB}::attention_probs", mutates_args=())
def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, N] float32 attention probabilities softmax(q kᵀ · scale + mask)."""
    return zero_tprune.attention_probs(q, k, scale, mask)


@attention_probs.register_fake
def _(q, k, scale, mask=None):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::weighted_pagerank", mutates_args=())
def weighted_pagerank(attn: torch.Tensor, iterations: int, v_min: float, v_max: float,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] Zero-TPrune importance (WPR with VHF and EIR); -inf where ``keep`` is False."""
    return zero_tprune.weighted_pagerank(attn, iterations, v_min, v_max, keep)


@weighted_pagerank.register_fake
def _(attn, iterations, v_min, v_max, keep=None):
    return attn.new_empty((attn.shape[0], attn.shape[-1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::similarity_keep", mutates_args=())
def similarity_keep(importance: torch.Tensor, keys: torch.Tensor, drop: int, num_prefix: int, partition: str) -> torch.Tensor:
    """[B, N] bool: False for the ``drop`` tokens the Zero-TPrune S-stage removes."""
    return zero_tprune.similarity_keep(importance, keys, drop, num_prefix, partition)


@similarity_keep.register_fake
def _(importance, keys, drop, num_prefix, partition):
    return importance.new_empty(importance.shape, dtype=torch.bool)


@torch.library.custom_op(f"{_LIB}::kcenter", mutates_args=())
def kcenter(features: torch.Tensor, k: int, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P + k] int64: the prefix, then k greedy k-center picks in sequence order; padding
    (``valid`` False, [B, N] or [N]) only after every real token."""
    return kcenter_method.kcenter(features, k, num_prefix, valid)


@kcenter.register_fake
def _(features, k, num_prefix, valid=None):
    return features.new_empty((features.shape[0], num_prefix + k), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::divprune", mutates_args=())
def divprune(features: torch.Tensor, k: int, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P + k] int64: the prefix, then k max-min diverse tokens in sequence order; padding
    (``valid`` False) only after every real token."""
    return divprune_method.divprune(features, k, num_prefix, valid)


@divprune.register_fake
def _(features, k, num_prefix, valid=None):
    return features.new_empty((features.shape[0], num_prefix + k), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::bipartite_match", mutates_args=())
def bipartite_match(keys: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe matching: (kept [B, N - r] int64 in order, assign [B, N] int64 slot of every token)."""
    return tome.bipartite_match(keys, r, num_prefix)


@bipartite_match.register_fake
def _(keys, r, num_prefix):
    b, n = keys.shape[0], keys.shape[1]
    return keys.new_empty((b, n - r), dtype=torch.int64), keys.new_empty((b, n), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::merge_tokens", mutates_args=())
def merge_tokens(x: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, count: int,
                 mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold x's tokens into ``count`` slots by ``assign``, weighted: (merged [B, count, C], weight sums)."""
    return tome.merge_tokens(x, weights, assign, count, mean)


@merge_tokens.register_fake
def _(x, weights, assign, count, mean):
    return x.new_empty((x.shape[0], count, x.shape[2])), x.new_empty((x.shape[0], count), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ([B, H, M, d]) over the keys/values at ``index`` ([B, K] rows of k, v; every key when None).

    Returns (softmax(q kᵢᵀ · scale) vᵢ [B, H, M, d], the attention mass each of those keys
    receives, summed over queries [B, H, K] float32) — the column sums a scorer needs, from the
    attention the layer computes anyway.
    """
    if index is not None:
        rows = index[:, None, :, None]
        k = torch.gather(k, 2, rows.expand(-1, k.shape[1], -1, k.shape[-1]))
        v = torch.gather(v, 2, rows.expand(-1, v.shape[1], -1, v.shape[-1]))
    probs = zero_tprune.attention_probs(q, k, scale)
    return torch.matmul(probs, v.float()).to(q.dtype), probs.sum(-2)


@sparse_attention.register_fake
def _(q, k, v, index, scale):
    keys = k.shape[2] if index is None else index.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1], keys), dtype=torch.float32)

