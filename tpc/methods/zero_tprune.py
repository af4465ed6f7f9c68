"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024, arXiv 2305.17328): importance from the
attention graph, then similarity among the less important tokens. No fine-tuning.

I-stage — Weighted PageRank (WPR). Each head's attention matrix A_h (row i: how query i
distributes its attention over keys) is the adjacency matrix of a graph; importance flows
along it, starting from a uniform score of 1 per token:

    s_h^(0) = 1,        s_h^(t+1) = A_hᵀ s_h^(t)          (paper Eq. 2: s(x_j) = Σ_i A_ij s(x_i))

A row-stochastic A keeps Σ_j s_j = N, so each head's scores have mean 1.
VHF (variance-based head filter): heads whose score variance lies outside [v_min, v_max]
(paper's best: [0.01, 0.7]) are left out — near-uniform heads carry no ranking, spiky ones
attend to a single token. EIR (emphasizing informative region) combines the kept heads by
root-mean-square, s = sqrt(mean_h s_h²), so a token important to any head stands out.

S-stage. The I'-stage importance partitions the non-prefix tokens (sequential: the less
important half is group A, the rest group B; or alternate by position, as ToMe). Each A
token is matched to its most similar B token (cosine similarity of head-averaged keys), and
the A tokens with the most similar partners are dropped: they repeat what B keeps.

The order is I' -> S -> I: importance (not pruning) guides the S-stage partition, the
S-stage drops near-duplicates, and the I-stage reruns WPR on the remaining graph and drops
the least important of the rest.
"""

from __future__ import annotations

import torch

from tpc.methods.evit import masked_logits

EPS = 1e-12


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) as float32: [B, H, N, N]."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.softmax(masked_logits(logits, mask), dim=-1)


def auto_iterations(layer: int, depth: int) -> int:
    """The paper's schedule: 30-50 iterations in the first layers, 5-10 in the middle, 1 at the end."""
    position = layer / max(1, depth - 1)
    if position < 0.25:
        return 30
    if position > 0.75:
        return 1
    return 5


def weighted_pagerank(attn: torch.Tensor, iterations: int, v_min: float = 0.01, v_max: float = 0.7,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """Importance [B, N] (float32) with VHF and EIR; tokens with ``keep`` False score -inf.

    ``keep`` ([B, N] bool) restricts the graph to the kept tokens: their rows and columns
    only, each row renormalized, scores starting at 1 on kept tokens.
    """
    b, h, n, _ = attn.shape
    if keep is None:
        keep = torch.ones(b, n, dtype=torch.bool, device=attn.device)
    k = keep.float()[:, None, :]  # [B, 1, N]
    a = attn.float()
    # The restricted graph A'_ij = A_ij k_i k_j / r_i with r_i = sum_j A_ij k_j, applied without
    # forming A': s'_j = k_j * sum_i (s_i k_i / r_i) A_ij.
    rows = torch.matmul(a, k.unsqueeze(-1)).squeeze(-1).clamp_min(EPS)  # [B, H, N]
    s = k.expand(b, h, n)
    for _ in range(iterations):
        s = torch.matmul((s * k / rows).unsqueeze(-2), a).squeeze(-2) * k
    count = k.sum(-1).clamp_min(1.0)  # [B, 1]
    mean = s.sum(-1) / count
    var = (((s - mean[..., None]) ** 2) * k).sum(-1) / count  # [B, H]
    use = ((var >= v_min) & (var <= v_max)).float()
    use = torch.where(use.sum(-1, keepdim=True) > 0, use, torch.ones_like(use))  # no head passes: use all
    score = torch.sqrt((s * s * use[..., None]).sum(1) / use.sum(-1, keepdim=True))
    return score.masked_fill(~keep, float("-inf"))


def partition_order(importance: torch.Tensor, num_prefix: int, partition: str = "sequential") -> tuple[torch.Tensor, torch.Tensor]:
    """(group A, group B) token positions, [B, nA] and [B, nB], among the non-prefix tokens."""
    b, n = importance.shape
    rest = n - num_prefix
    n_a = rest // 2
    if partition == "sequential":
        order = torch.sort(importance[:, num_prefix:], dim=1, stable=True).indices + num_prefix  # least important first
        return order[:, :n_a], order[:, n_a:]
    if partition == "alternate":
        pos = torch.arange(num_prefix, n, device=importance.device).expand(b, rest)
        return pos[:, 1::2][:, :n_a], torch.cat([pos[:, 0::2], pos[:, 1::2][:, n_a:]], 1)
    raise ValueError(f"unknown partition {partition!r}")


def similarity_keep(importance: torch.Tensor, keys: torch.Tensor, drop: int, num_prefix: int,
                    partition: str = "sequential") -> torch.Tensor:
    """S-stage: [B, N] bool, False for the ``drop`` A tokens most similar to a B token."""
    group_a, group_b = partition_order(importance, num_prefix, partition)
    keep = torch.ones(importance.shape, dtype=torch.bool, device=importance.device)
    drop = min(drop, group_a.shape[1])
    if drop <= 0:
        return keep
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
    sim = torch.matmul(unit[rows, group_a], unit[rows, group_b].transpose(-1, -2))  # [B, nA, nB]
    best = sim.max(-1).values
    order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :drop]
    return keep.scatter(1, torch.gather(group_a, 1, order), False)


def s_stage_drop_count(tokens: int, num_prefix: int, kept: int, similarity: float) -> int:
    """How many of a layer's dropped tokens the S-stage removes (the rest go to the I-stage)."""
    dropped = tokens - num_prefix - kept
    return min(int(round(similarity * dropped)), (tokens - num_prefix) // 2)
