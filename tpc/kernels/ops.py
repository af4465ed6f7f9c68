"""Definitions of the ``tpc::`` ops: reference and fake implementations.

Shapes use B for batch, N for tokens in, K for tokens kept, P for prefix tokens, H heads,
d head width, C channels.
"""

from __future__ import annotations

import torch

from tpc.methods import baseline, evit

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


OPS = {
    "cls_attention": torch.ops.tpc.cls_attention.default,
    "random_scores": torch.ops.tpc.random_scores.default,
    "select_topk": torch.ops.tpc.select_topk.default,
    "gather_tokens": torch.ops.tpc.gather_tokens.default,
}
