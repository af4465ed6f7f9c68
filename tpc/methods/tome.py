"""Token Merging (ToMe; Bolya et al., ICLR 2023): merge similar tokens instead of dropping.

Bipartite soft matching (ToMe, Sec. 3): split the tokens alternately into sets A (even
positions) and B (odd); score every A-B pair by cosine similarity of the head-averaged
keys; each A token proposes its most similar B token; the r A tokens with the strongest
proposals merge into their partners. Prefix tokens are protected: an A prefix never
merges, a B prefix never receives a merge. ToMe bounds r by (N - P) // 2 (``max_merges``).

Merging is a size-weighted average, x_b <- (Σ s_i x_i) / (Σ s_i), and sizes add up and are
carried to later merges; later attention adds log(size) to its logits (proportional
attention, ToMe Eq. 1) so a merged token counts as the tokens it stands for.

The merged sequence is in ToMe's order, because the next layer's alternating split depends
on it: the prefix tokens, then the unmerged A tokens, then the B tokens (ToMe's
``cat([unm, dst])``, with the distillation token moved to the front). The unmerged A tokens
keep their sequence order when there is a prefix (ToMe sorts them to keep [CLS] first) and
the order of their proposals, strongest first, when there is none (ToMe leaves them so).
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def max_merges(tokens: int, prefix: int) -> int:
    """ToMe's bound on r at a layer of ``tokens`` tokens: at most half the unprotected ones."""
    return max(0, (tokens - prefix) // 2)


def bipartite_match(keys: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, N - r]: the position each merged-sequence token stands for, in ToMe's order;
    assign [B, N]: the merged-sequence slot every token goes to). r = 0 changes nothing."""
    b, n, _ = keys.shape
    device = keys.device
    pos = torch.arange(n, device=device)
    if r == 0:
        return pos.expand(b, n).clone(), pos.expand(b, n).clone()
    a_pos, b_pos = pos[0::2], pos[1::2]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    scores = torch.matmul(unit[:, 0::2], unit[:, 1::2].transpose(-1, -2))  # [B, nA, nB]
    scores = scores.masked_fill((a_pos < num_prefix)[None, :, None], NEG)
    scores = scores.masked_fill((b_pos < num_prefix)[None, None, :], NEG)
    best, partner = scores.max(dim=-1)  # [B, nA]
    order = torch.sort(best, dim=1, descending=True, stable=True).indices  # A-local, strongest first
    src = order[:, :r]  # A-local indices that merge away
    merged = a_pos[src]  # [B, r] original positions
    dst = b_pos[torch.gather(partner, 1, src)]
    # one sort key per token: prefix < unmerged A < B < merged A
    if num_prefix > 0:
        a_rank = a_pos.expand(b, -1)
    else:
        a_rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand(b, -1))
    key = torch.empty(b, n, dtype=torch.int64, device=device)
    key[:, 0::2] = torch.where(a_pos < num_prefix, a_pos, n + a_rank)
    key[:, 1::2] = torch.where(b_pos < num_prefix, b_pos, 2 * n + b_pos).expand(b, -1)
    key = key.scatter(1, merged, 3 * n)
    index = torch.sort(key, dim=1).indices[:, : n - r]
    slot = torch.zeros(b, n, dtype=torch.int64, device=device).scatter(1, index, torch.arange(n - r, device=device).expand(b, -1))
    assign = slot.scatter(1, merged, torch.gather(slot, 1, dst))
    return index, assign


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
