"""DHSA's chunk representations, kept alongside the KV cache as it grows.

A decode step of a dhsa layer scores the chunks of its cache from their representations
(sqrt(n) · mean of a chunk's n keys) and spans (first position, length), so that it never reads the
layer's keys to choose. ``ChunkState`` holds them for each dhsa layer in preallocated buffers: computed
once from the prompt's keys after the prefill (``tpc::chunk_summary``), then updated per new token by
the same boundary rule (``tpc/decode/chunk_ops.py``): the new key either extends the last chunk (its
sum of keys and length grow) or opens a new one, which only the new key's similarity with the
previous key and the last chunk's length decide. The step gets views of the first ceil(L / min_chunk)
chunk slots, as it gets views of the KV buffer.
"""

from __future__ import annotations

import torch

from tpc.decode import chunk_ops  # noqa: F401  (registers tpc::chunk_summary)
from tpc.decode.chunk_ops import adjacent_similarity, chunk_slots, opens
from tpc.decode.pages import step_mask
from tpc.errors import TpcError


def refuse_holes(attention_mask: torch.Tensor) -> None:
    """A chunk is a span (first position, length) of consecutive positions: a masked position after an example's
    first real one would fall inside a span. Left padding only, in one line."""
    real = attention_mask.bool()
    holes = real.cummax(-1).values & ~real
    if bool(holes.any()):
        row, column = (int(i) for i in torch.nonzero(holes)[0])
        raise TpcError(f"dhsa takes left-padded prompts only: example {row}'s attention_mask is 0 at position {column}, "
                       "after its first real token; drop the masked tokens from the prompt or use tidal or quest")


def chunks_for(plan, past: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per dhsa layer of ``plan``, the representations and spans of its cached keys' chunks, flat:
    [reps, spans, reps, spans, …] (``past``: the step's flat keys and values; ``attention_mask``: [B, L + 1])."""
    refuse_holes(attention_mask)
    mask = step_mask(attention_mask)
    return [t for layer in plan.sparse for t in torch.ops.tpc.chunk_summary(past[2 * layer], mask, *plan.chunk)]


class ChunkState:
    """Per dhsa layer, its chunks' representations and spans in preallocated buffers, updated per new token."""

    def __init__(self, plan, past: list[torch.Tensor], attention_mask: torch.Tensor, capacity: int):
        """``past``/``attention_mask``: the first step's cache views and its [B, L + 1] mask; ``capacity``:
        positions the cache will hold (prompt and new tokens)."""
        self.chunk, self.layers = plan.chunk, list(plan.sparse)
        self.length = past[0].shape[2]
        slots = chunk_slots(capacity, self.chunk[0])
        self.representations, self.spans, self.sums, self.last, self.current = [], [], [], [], []
        summary = chunks_for(plan, past, attention_mask)
        for layer, reps, spans in zip(self.layers, summary[::2], summary[1::2]):
            b, heads, used, width = reps.shape
            rep_buf = reps.new_zeros(b, heads, slots, width)
            rep_buf[:, :, :used] = reps
            span_buf = spans.new_zeros(b, 2, slots)
            span_buf[:, :, :used] = spans
            self.representations.append(rep_buf)
            self.spans.append(span_buf)
            self.sums.append(rep_buf * span_buf[:, None, 1, :, None].float().sqrt())
            self.last.append(past[2 * layer][:, :, -1].float())  # [B, Hkv, d]: the key at position L - 1
            self.current.append((span_buf[:, 1] > 0).sum(-1) - 1)  # [B]: each example's last chunk

    def views(self) -> list[torch.Tensor]:
        used = chunk_slots(self.length, self.chunk[0])
        return [t for reps, spans in zip(self.representations, self.spans)
                for t in (reps[:, :, :used], spans[:, :, :used])]

    def append(self, new: tuple) -> None:
        """Fold the new token's keys (the step's flat new keys and values, [B, Hkv, 1, d] each), at position
        L, into each layer's last chunk, or open a new chunk with it."""
        min_chunk, max_chunk, threshold = self.chunk
        for i, layer in enumerate(self.layers):
            key = new[2 * layer][:, :, 0].float()  # [B, Hkv, d]
            reps, spans, sums = self.representations[i], self.spans[i], self.sums[i]
            b, heads, _, width = reps.shape
            length = spans[:, 1].gather(1, self.current[i][:, None])[:, 0]
            fresh = opens(length, adjacent_similarity(self.last[i], key), min_chunk, max_chunk, threshold)
            self.current[i] = self.current[i] + fresh.long()
            at = self.current[i][:, None]
            slot = at[:, None, :, None].expand(b, heads, 1, width)
            total = torch.where(fresh[:, None, None, None], key[:, :, None],
                                sums.gather(2, slot) + key[:, :, None])
            count = torch.where(fresh, 1, spans[:, 1].gather(1, at)[:, 0] + 1)
            start = torch.where(fresh, self.length, spans[:, 0].gather(1, at)[:, 0])
            sums.scatter_(2, slot, total)
            reps.scatter_(2, slot, total / count.float().sqrt()[:, None, None, None])
            spans.scatter_(2, at[:, None].expand(b, 2, 1), torch.stack([start, count], 1)[:, :, None])
            self.last[i] = key
        self.length += 1
