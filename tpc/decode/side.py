"""What a decode step takes beside the KV cache, by its plan: Quest's page bounds (``tpc/decode/pages.py``)
or DHSA's chunk summaries (``tpc/decode/chunks.py``), computed from the prompt's keys after the prefill
and kept up to date as tokens are appended, so that the step scores a layer's cache without reading it."""

from __future__ import annotations

import torch

from tpc.decode.capture import MAX_CACHE
from tpc.decode.chunks import ChunkState, chunks_for
from tpc.decode.pages import PageBounds, bounds_for


def takes_side(plan) -> bool:
    """Whether the step takes such inputs as a fifth argument (a quest or dhsa plan)."""
    return plan is not None and (plan.page is not None or plan.chunk is not None)


def side_inputs(plan, past: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The fifth argument of a step over ``past`` (flat keys and values) and ``attention_mask`` [B, L + 1],
    computed from the cached keys."""
    return bounds_for(plan, past, attention_mask) if plan.page is not None else chunks_for(plan, past, attention_mask)


def side_state(plan, past: list[torch.Tensor], attention_mask: torch.Tensor, capacity: int):
    """What ``generate()`` keeps beside its KV buffer: ``views()`` for each step, ``append(new)`` after it."""
    kind = PageBounds if plan.page is not None else ChunkState
    return kind(plan, past, attention_mask, capacity)


def unit(plan) -> int:
    """Cached positions per page (quest) or per chunk at the least (dhsa): an exported example caches more than
    one unit, so that torch.export does not specialize the side inputs' count of pages or chunks to 1."""
    return plan.page if plan.page is not None else plan.chunk[0]


def side_dims(plan, batch) -> list[dict]:
    """The dynamic shapes of the side inputs for torch.export: batch and the count of pages or chunk slots."""
    if plan.page is not None:
        return [{0: batch, 3: torch.export.Dim("pages", min=1, max=MAX_CACHE)}] * len(plan.sparse)
    chunks = torch.export.Dim("chunks", min=1, max=MAX_CACHE)
    return [{0: batch, 2: chunks}] * (2 * len(plan.sparse))
