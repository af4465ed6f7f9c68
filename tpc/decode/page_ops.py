"""The ``tpc::`` ops of Quest's query-aware page selection (reference and fake implementations).

Quest (Tang et al., ICML 2024, arXiv 2406.10774, §3): the KV cache is cut into pages of S
consecutive positions; per page the element-wise minimum m and maximum M of its keys bound
any key in it, so for a query q the page's largest logit is at most

    U(q, page) = sum_d max(q_d · m_d, q_d · M_d)                      (Quest, Alg. 1)

and attention reads only the pages with the highest bound. Shapes: B batch, H query heads,
Hkv KV heads, G = H / Hkv, L cached positions (the new token not included), P = ceil(L / S)
pages (the last one partial when S does not divide L), K pages kept, d head width. ``mask``
is the model's SDPA mask of the decode step, [B, 1, 1, L + 1] (bool: may attend; float:
added to the logits), its last column the new token; left padding is its false columns.

Pages are aligned at each example's first prompt token: page j of example b holds positions
c_b + j·S … c_b + (j + 1)·S − 1, c_b its count of masked cached positions modulo S (the left
padding's length modulo S; the positions before c_b are padding). So an example's pages hold
the same tokens in any batch, whatever padding the batch gives it, and P = ceil(L / S) pages
cover every example's positions (trailing pages past the cache are empty, never ranked).
"""

from __future__ import annotations

import torch

from tpc.decode.ops import selected_size

_LIB = "tpc"


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """[B, L + 1] bool: the positions each example may attend to."""
    row = mask[:, 0, 0]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min


def _pages(length, page: int):
    return (length + page - 1) // page


def page_layout(mask: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, P · S] int64 cache positions of every page slot, page after page, clamped into the cache;
    [B, P · S] bool: the slot holds a cached position the example may attend to)."""
    valid = _valid(mask)[:, :-1]
    length = valid.shape[1]
    start = (~valid).sum(-1, keepdim=True) % page  # c_b
    slots = start + torch.arange(_pages(length, page) * page, device=mask.device)
    inside = slots < length
    positions = slots.clamp(max=length - 1)
    return positions, inside & torch.gather(valid, 1, positions)


def page_valid(mask: torch.Tensor, page: int) -> torch.Tensor:
    """[B, P] bool: pages holding at least one position the example may attend to (not all padding)."""
    _, used = page_layout(mask, page)
    return used.reshape(used.shape[0], -1, page).any(-1)


@torch.library.custom_op(f"{_LIB}::page_bounds", mutates_args=())
def page_bounds(keys: torch.Tensor, mask: torch.Tensor, page: int) -> torch.Tensor:
    """[B, Hkv, 2, P, d]: per page of ``page`` cached positions, the element-wise minimum (index 0)
    and maximum (index 1) of the keys of the positions the example may attend to (padding is left
    out; a page of padding only holds zeros, and :func:`page_scores` never ranks it).

    keys: [B, Hkv, L, d], rotary applied (the layer's cached keys); mask: [B, 1, 1, L + 1]."""
    b, heads, length, width = keys.shape
    positions, used = page_layout(mask, page)
    paged = torch.gather(keys, 2, positions[:, None, :, None].expand(b, heads, -1, width))
    paged = paged.reshape(b, heads, -1, page, width)
    used = used.reshape(b, 1, -1, page, 1)
    low = paged.masked_fill(~used, float("inf")).amin(3)
    high = paged.masked_fill(~used, float("-inf")).amax(3)
    some = used.any(3)
    return torch.stack([low.masked_fill(~some, 0), high.masked_fill(~some, 0)], 2)


@page_bounds.register_fake
def _(keys, mask, page):
    b, heads, length, width = keys.shape
    return keys.new_empty((b, heads, 2, _pages(length, page), width))


@torch.library.custom_op(f"{_LIB}::page_scores", mutates_args=())
def page_scores(q: torch.Tensor, bounds: torch.Tensor, mask: torch.Tensor, page: int) -> torch.Tensor:
    """[B, Hkv, P] float32: each page's upper bound on the new query's logit q·k (unscaled), summed
    over the G query heads of each KV head; pages of padding only are -inf.

    q: [B, H, 1, d]; bounds: :func:`page_bounds`. Since max(q·m, q·M) per dimension is
    max(q, 0)·M + min(q, 0)·m, the bound is two matrix products."""
    b, heads, _, width = q.shape
    kv_heads = bounds.shape[1]
    grouped = q.float().reshape(b, kv_heads, heads // kv_heads, width)
    low, high = bounds.float().unbind(2)  # [B, Hkv, P, d]
    upper = grouped.clamp(min=0) @ high.transpose(-1, -2) + grouped.clamp(max=0) @ low.transpose(-1, -2)
    return upper.sum(2).masked_fill(~page_valid(mask, page)[:, None], float("-inf"))


@page_scores.register_fake
def _(q, bounds, mask, page):
    return q.new_empty(bounds.shape[:2] + bounds.shape[3:4], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::top_pages", mutates_args=())
def top_pages(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, Hkv, min(count, P)] int64: per example and KV head the best-scored pages, in ascending
    order (attention reads the cache in order); ties go to the lower page (a stable sort)."""
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :min(count, scores.shape[-1])]
    return torch.sort(best, dim=-1).values


@top_pages.register_fake
def _(scores, count):
    return scores.new_empty((*scores.shape[:2], selected_size(count, scores.shape[-1])), dtype=torch.int64)


def _slots(pages: torch.Tensor, mask: torch.Tensor, page: int) -> torch.Tensor:
    """[B, Hkv, K · S]: the cache positions of the given pages, page after page (past the cache too)."""
    start = (~_valid(mask)[:, :-1]).sum(-1) % page  # c_b
    offsets = torch.arange(page, device=pages.device)
    return (start[:, None, None, None] + pages[..., None] * page + offsets).flatten(-2)


@torch.library.custom_op(f"{_LIB}::page_positions", mutates_args=())
def page_positions(pages: torch.Tensor, mask: torch.Tensor, page: int) -> torch.Tensor:
    """[B, Hkv, K · S] int64: the cache positions of the selected pages, in order; positions past
    the cache (the partial last page) point at its last position, and :func:`page_mask` hides them."""
    return _slots(pages, mask, page).clamp(max=mask.shape[-1] - 2)


@page_positions.register_fake
def _(pages, mask, page):
    return pages.new_empty((*pages.shape[:2], pages.shape[2] * page))


@torch.library.custom_op(f"{_LIB}::page_mask", mutates_args=())
def page_mask(mask: torch.Tensor, pages: torch.Tensor, page: int) -> torch.Tensor:
    """[B, Hkv, 1, K · S + 1], ``mask``'s dtype: the attention mask over the selected pages'
    positions (as :func:`page_positions` gives them) then the new token; padding and positions
    past the cache may not be attended to."""
    length = mask.shape[-1] - 1
    slots = _slots(pages, mask, page)
    row = mask[:, 0, 0]  # [B, L + 1]
    chosen = torch.gather(row[:, None].expand(-1, pages.shape[1], -1), 2, slots.clamp(max=length - 1))
    outside = slots >= length
    if row.dtype == torch.bool:
        chosen = chosen & ~outside
    else:
        chosen = chosen.masked_fill(outside, torch.finfo(row.dtype).min)
    new = row[:, None, -1:].expand(-1, pages.shape[1], 1)
    return torch.cat([chosen, new], -1)[:, :, None]


@page_mask.register_fake
def _(mask, pages, page):
    return mask.new_empty((pages.shape[0], pages.shape[1], 1, pages.shape[2] * page + 1))
