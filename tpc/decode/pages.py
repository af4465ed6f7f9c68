"""Quest's per-page key bounds, kept alongside the KV cache as it grows.

Quest (arXiv 2406.10774, §3.2) stores, per page of S cached positions, the element-wise
minimum and maximum of the page's keys, updated when a token is appended, so that a decode
step scores pages from 2 · d numbers per page instead of reading every key. ``PageBounds``
holds them for each quest layer in one preallocated [B, Hkv, 2, pages, d] buffer (min at index
0, max at 1): computed once from the prompt's keys (``tpc::page_bounds``), then one page per
layer updated per new token (the page the new position falls into: a fresh page takes the new
key as its min and max, a partial one its element-wise min and max with it). The step gets
views of the first ceil(L / S) pages, as it gets views of the KV buffer.

Pages are aligned at each example's first prompt token (``tpc/decode/page_ops.py``): c_b, the
example's count of masked cached positions modulo S, is fixed after the prompt (new tokens are
never masked), and position p lies in page (p − c_b) // S.
"""

from __future__ import annotations

import torch

from tpc.decode import page_ops  # noqa: F401  (registers tpc::page_bounds)


def step_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The decode step's mask as the page ops take it: [B, L + 1] 0/1 -> [B, 1, 1, L + 1] bool."""
    return attention_mask.bool()[:, None, None]


def bounds_for(plan, past: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per quest layer of ``plan``, the page bounds of its cached keys (``past``: the step's flat list of
    keys and values; ``attention_mask``: the step's [B, L + 1])."""
    mask = step_mask(attention_mask)
    return [torch.ops.tpc.page_bounds(past[2 * layer], mask, plan.page) for layer in plan.sparse]


class PageBounds:
    """Per quest layer, the page bounds of its cache in one preallocated buffer, updated per new token."""

    def __init__(self, plan, past: list[torch.Tensor], attention_mask: torch.Tensor, capacity: int):
        """``past``/``attention_mask``: the first step's cache views and its [B, L + 1] mask; ``capacity``:
        positions the cache will hold (prompt and new tokens)."""
        self.page, self.layers = plan.page, list(plan.sparse)
        self.length = past[0].shape[2]
        self.start = (attention_mask[:, :self.length] == 0).sum(-1) % self.page  # c_b, per example
        self.buffers = []
        for bounds in bounds_for(plan, past, attention_mask):
            b, heads, _, pages, width = bounds.shape
            buf = bounds.new_zeros(b, heads, 2, -(-capacity // self.page), width)
            buf[:, :, :, :pages] = bounds
            self.buffers.append(buf)

    def views(self) -> list[torch.Tensor]:
        pages = -(-self.length // self.page)
        return [buf[:, :, :, :pages] for buf in self.buffers]

    def append(self, new: tuple) -> None:
        """Fold the new token's keys (the step's flat new keys and values, [B, Hkv, 1, d] each) into
        the page its position L falls into."""
        offset = self.length - self.start
        fresh = (offset % self.page == 0)[:, None, None, None, None]
        for buf, layer in zip(self.buffers, self.layers):
            b, heads, _, _, width = buf.shape
            index = (offset // self.page)[:, None, None, None, None].expand(b, heads, 2, 1, width)
            old = buf.gather(3, index)
            key = new[2 * layer][:, :, None]  # [B, Hkv, 1, 1, d]
            low = torch.where(fresh, key, torch.minimum(old[:, :, :1], key))
            high = torch.where(fresh, key, torch.maximum(old[:, :, 1:], key))
            buf.scatter_(3, index, torch.cat([low, high], 2))
        self.length += 1
