"""Token Merging (ToMe; Bolya et al., ICLR 2023): merge similar tokens instead of dropping.

Bipartite soft matching (ToMe, Sec. 3): split the tokens alternately into sets A (even
positions) and B (odd); score every A-B pair by cosine similarity of the head-averaged
keys; each A token proposes its most similar B token; the r A tokens with the strongest
proposals merge into their partners. Prefix tokens are protected: an A prefix never
merges, a B prefix never receives a merge.

Merging is a size-weighted average, x_b <- (Σ s_i x_i) / (Σ s_i), and sizes add up and are
carried to later merges; later attention adds log(size) to its logits (proportional
attention, ToMe Eq. 1) so a merged token counts as the tokens it stands for. Kept tokens
stay in sequence order.
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def bipartite_match(keys: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [B, N - r] positions in order, assign [B, N]: each token's slot among the kept)."""
    b, n, _ = keys.shape
    device = keys.device
    pos = torch.arange(n, device=device)
    a_pos, b_pos = pos[0::2], pos[1::2]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    scores = torch.matmul(unit[:, 0::2], unit[:, 1::2].transpose(-1, -2))  # [B, nA, nB]
    scores = scores.masked_fill((a_pos < num_prefix)[None, :, None], NEG)
    scores = scores.masked_fill((b_pos < num_prefix)[None, None, :], NEG)
    best, partner = scores.max(dim=-1)  # [B, nA]
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    src = order[:, :r]  # A-local indices that merge away
    merged = a_pos[src]  # [B, r] original positions
    dst = b_pos[torch.gather(partner, 1, src)]
    removed = torch.zeros(b, n, dtype=torch.bool, device=device).scatter(1, merged, True)
    kept = torch.sort(pos.expand(b, n).masked_fill(removed, n), dim=1).values[:, : n - r]
    slot = torch.zeros(b, n, dtype=torch.int64, device=device).scatter(1, kept, torch.arange(n - r, device=device).expand(b, -1))
    assign = slot.scatter(1, merged, torch.gather(slot, 1, dst))
    return kept, assign


def merge_tokens(x: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, count: int,
                 mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the N tokens of x into ``count`` slots: (merged [B, count, C], weight sums [B, count]).

    Slot i receives Σ_{assign_j = i} w_j x_j, divided by Σ w_j when ``mean`` (ToMe's
    size-weighted average).
    """
    b, n, c = x.shape
    w = weights.to(torch.float32)
    total = torch.zeros(b, count, dtype=torch.float32, device=x.device).scatter_add(1, assign, w)
    acc = torch.zeros(b, count, c, dtype=torch.float32, device=x.device)
    acc = acc.scatter_add(1, assign.unsqueeze(-1).expand(b, n, c), x.float() * w.unsqueeze(-1))
    if mean:
        acc = acc / total.clamp_min(1e-12).unsqueeze(-1)
    return acc.to(x.dtype), total
