"""Greedy k-center selection over token features (ToDRE: token diversity for pruning).

Farthest-point selection (Gonzalez, 1985): the prefix tokens are the first centers; each
step adds the token farthest from its nearest center, with d(i, j) = 1 − cos(x_i, x_j).
The kept set covers feature space evenly instead of crowding where attention points.
Without prefix tokens, the first center is the token farthest from the mean feature.
With ``valid`` (False at padding), padding never outranks a real token: padding is picked only
once every real token is kept, first positions first.
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - torch.matmul(unit, unit.transpose(-1, -2))


def demote_padding(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Distances (in [0, 2]) with every padding token scored below every real one, and padding
    ordered by position: -4 - j/N at padding position j. ``valid``: [B, N] or [N] bool."""
    if valid is None:
        return scores
    n = scores.shape[-1]
    order = -4.0 - torch.arange(n, device=scores.device, dtype=scores.dtype) / n
    return torch.where(valid, scores, order)


def greedy_farthest(dist: torch.Tensor, first_min: torch.Tensor, count: int, taken: torch.Tensor) -> torch.Tensor:
    """``count`` greedy max-min picks: [B, count] positions (ties go to the lower index).

    dist: [B, N, N]; first_min: [B, N] current distance of each token to the chosen set;
    taken: [B, N] bool, positions that may not be picked.
    """
    b = dist.shape[0]
    rows = torch.arange(b, device=dist.device)
    mind = first_min.masked_fill(taken, NEG)
    picks = []
    for _ in range(count):
        i = mind.argmax(dim=1)
        picks.append(i)
        mind = torch.minimum(mind, dist[rows, i])
        mind[rows, i] = NEG
    return torch.stack(picks, 1) if picks else torch.zeros(b, 0, dtype=torch.int64, device=dist.device)


def kcenter(features: torch.Tensor, k: int, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P + k] kept positions, prefix first, then k centers in sequence order."""
    b, n, _ = features.shape
    rows = torch.arange(b, device=features.device)
    dist = cosine_distance(features)
    taken = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    taken[:, :num_prefix] = True
    seeds = features.new_zeros((b, 0), dtype=torch.int64)
    if num_prefix:
        nearest = dist[:, :num_prefix, :].min(dim=1).values
    elif k:
        mean = features.float().mean(1, keepdim=True)
        far = cosine_distance(torch.cat([mean, features.float()], 1))[:, 0, 1:]
        seeds = demote_padding(far, valid).argmax(1, keepdim=True)
        taken[rows, seeds[:, 0]] = True
        nearest = dist[rows, seeds[:, 0]]
    else:
        nearest = dist[:, 0]
    nearest = demote_padding(nearest, valid)
    picks = torch.cat([seeds, greedy_farthest(dist, nearest, k - seeds.shape[1], taken)], 1)
    prefix = torch.arange(num_prefix, device=features.device).expand(b, num_prefix)
    return torch.cat([prefix, torch.sort(picks, dim=1).values], 1)
