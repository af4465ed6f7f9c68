"""The ``tpc::`` ops of decode-time sparse attention (reference and fake implementations).

Shapes: B batch, H query heads, G = H / Hkv query heads per KV head (grouped-query
attention), L cached positions (the new token not included), K positions kept, d head width.
The attention mask is the model's own SDPA mask of the decode step, [B, 1, 1, L + 1] (bool:
may attend; float: added to the logits), its last column the new token.
"""

from __future__ import annotations

import torch

_LIB = "tpc"


def _logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hkv, G, L + 1] float32 logits of each query head over the keys of its KV head."""
    b, h, _, d = q.shape
    groups = h // k.shape[1]
    logits = torch.matmul(q.float().reshape(b, k.shape[1], groups, d), k.float().transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


@torch.library.custom_op(f"{_LIB}::group_attention", mutates_args=())
def group_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hkv, L + 1] float32: the attention the new token's query heads give each key, summed
    over the query heads of each KV group (TidalDecode's selection score, grouped-query form).

    q: [B, H, 1, d]; k: [B, Hkv, L + 1, d], the layer's keys with the new token's last.
    With one query head per KV head this ranks keys as the paper's top-k of q·kᵀ does.
    """
    return torch.softmax(_logits(q, k, mask, scale), dim=-1).sum(2)


@group_attention.register_fake
def _(q, k, mask, scale):
    return q.new_empty((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::top_positions", mutates_args=())
def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, Hkv, min(count, L)] int64: per example and KV head, the best-scored cached positions
    (``scores``: [B, Hkv, L + 1], the last column the new token, which every layer attends
    anyway and is not chosen among), in ascending order so attention reads them in cache order.
    Ties go to the lower position (a stable sort)."""
    past = scores[..., :-1]
    keep = min(count, past.shape[-1])
    best = torch.sort(past, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(best, dim=-1).values


@top_positions.register_fake
def _(scores, count):
    return scores.new_empty((*scores.shape[:2], selected_size(count, scores.shape[-1] - 1)), dtype=torch.int64)


def selected_size(count, available):
    """The fake size of min(count, available) selected items. A symbolic ``count`` (a ratio of the cache, computed
    from the cache length) is 1 at short caches, which a size computed from the cache length would turn into a
    guard torch.export refuses (backed sizes are assumed >= 2): it becomes a fresh size (at least 1; the op
    itself returns at most ``available``)."""
    if isinstance(count, torch.SymInt):
        return torch.library.get_ctx().new_dynamic_size(min=1)
    return torch.sym_min(count, available)


@torch.library.custom_op(f"{_LIB}::gather_positions", mutates_args=())
def gather_positions(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, K, d]: rows ``index`` ([B, Hkv, K]) of ``cache`` ([B, Hkv or 1, L', d]) along
    the positions; a cache with one head (a mask) is read per KV head. Only K rows are read."""
    b, heads, kept = index.shape
    src = cache.expand(b, heads, *cache.shape[2:])
    return torch.gather(src, 2, index[..., None].expand(b, heads, kept, cache.shape[-1]))


@gather_positions.register_fake
def _(cache, index):
    return cache.new_empty((*index.shape, cache.shape[-1]))


def _query_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """[B, Hkv, G, W, N] float32 softmax attention of the last W = min(window, T) queries (q: [B, H, T, d])
    over the keys of their KV head (k: [B, Hkv, N, d]; mask [B, 1, T or 1, N]); a query that sees no key
    (a padding query) gives 0 everywhere."""
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    w = min(window, t)
    rows = q[:, :, t - w:].float().reshape(b, kv_heads, h // kv_heads, w, d)
    logits = torch.matmul(rows, k.float()[:, :, None].transpose(-1, -2)) * scale
    mask = mask[:, :, -w:] if mask.shape[2] > 1 else mask
    mask = mask[:, :, None]  # [B, 1, 1, W or 1, N]
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask.float()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


@torch.library.custom_op(f"{_LIB}::attention_mass", mutates_args=())
def attention_mass(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """[B, Hkv, N] float32: the attention the last ``window`` queries give each key, summed over those
    queries and over the query heads of each KV group (H2O's accumulated attention, SnapKV's vote).

    q: [B, H, T, d] (rotary applied); k: [B, Hkv, N, d], the layer's cached keys then the T new ones;
    mask: the layer's SDPA mask [B, 1, T, N] (bool: may attend; float: added). Queries are taken
    in blocks of 256 so a long prefill never holds its whole T × N attention at once."""
    t = q.shape[2]
    w = min(window, t)
    total = q.new_zeros((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)
    for start in range(t - w, t, 256):
        stop = min(start + 256, t)
        block_mask = mask[:, :, start:stop] if mask.shape[2] > 1 else mask
        total += _query_probs(q[:, :, start:stop], k, block_mask, scale, stop - start).sum((2, 3))
    return total


@attention_mass.register_fake
def _(q, k, mask, scale, window):
    return q.new_empty((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::below_mean_counts", mutates_args=())
def below_mean_counts(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float,
                      window: int) -> torch.Tensor:
    """[B, Hkv, W, N] float32, W = min(window, T): for each of the last W queries, how many query heads
    of each KV group give the key less attention than the mean 1 / t over the t keys that query sees
    (Scissorhands' "unimportant"); keys a query does not see count 0."""
    probs = _query_probs(q, k, mask, scale, window)
    visible = _visible(mask, probs.shape)
    mean = 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
    return ((probs < mean) & visible).float().sum(2)


def _visible(mask: torch.Tensor, shape) -> torch.Tensor:
    """[B, Hkv, G, W, N] bool: which keys each of the last W queries may attend to (from the SDPA mask)."""
    w = shape[3]
    mask = mask[:, :, -w:] if mask.shape[2] > 1 else mask
    visible = mask if mask.dtype == torch.bool else mask > float("-inf")
    return visible[:, :, None].expand(shape)


@below_mean_counts.register_fake
def _(q, k, mask, scale, window):
    return q.new_empty((q.shape[0], k.shape[1], torch.sym_min(window, q.shape[2]), k.shape[2]),
                       dtype=torch.float32)
