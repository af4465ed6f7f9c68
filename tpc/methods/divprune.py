"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse token subset.

Token selection as a max-min diversity problem over d(i, j) = 1 − cos(x_i, x_j), solved
greedily: the first pick is the token farthest from its nearest neighbour; each next pick
maximizes its minimum distance to the picks so far. Prefix tokens are always kept and do
not take part; the kept indices are sorted back to sequence order. With ``valid`` (False at
padding), padding is picked only once every real token is kept (see ``demote_padding``).
"""

from __future__ import annotations

import torch

from tpc.methods.kcenter import cosine_distance, demote_padding, greedy_farthest


def divprune(features: torch.Tensor, k: int, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P + k] kept positions: the prefix, then k diverse tokens in sequence order."""
    b, n, _ = features.shape
    prefix = torch.arange(num_prefix, device=features.device).expand(b, num_prefix)
    if k == 0:
        return prefix.clone()
    dist = cosine_distance(features[:, num_prefix:])
    m = n - num_prefix
    eye = torch.eye(m, dtype=torch.bool, device=features.device)
    valid = None if valid is None else valid[..., num_prefix:]
    nearest_neighbour = dist.masked_fill(eye, float("inf")).min(dim=2).values
    first = demote_padding(nearest_neighbour, valid).argmax(dim=1)  # farthest from its nearest neighbour
    rows = torch.arange(b, device=features.device)
    taken = torch.zeros(b, m, dtype=torch.bool, device=features.device)
    taken[rows, first] = True
    rest = greedy_farthest(dist, demote_padding(dist[rows, first], valid), k - 1, taken)
    picks = torch.cat([first[:, None], rest], 1) + num_prefix
    return torch.cat([prefix, torch.sort(picks, dim=1).values], 1)
