"""[CLS]-attention token scores (EViT, Liang et al., ICLR 2022; VTC-CLS, 2024).

EViT keeps the tokens the [CLS] token attends to most: with per-head attention
A_h = softmax(q_h kᵀ_h · s + bias), the score of token j is the head mean of the [CLS] row,

    score_j = 1/H · Σ_h A_h[0, j]                                   (EViT, Sec. 3.2)

Only the [CLS] row is computed (one query against N keys per head), so scoring costs
O(H·N·d) even when the model's attention never materializes A.
"""

from __future__ import annotations

import torch


def masked_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply an SDPA-style mask (bool: True may attend; float: added) to [..., Nq, N] logits."""
    if mask is None:
        return logits
    if mask.shape[-2] != logits.shape[-2]:
        mask = mask[..., : logits.shape[-2], :]
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-mean attention of query 0 to every key.

    q, k: [B, H, N, d]. mask: broadcastable to [B, H, N, N], bool (True = may attend) or
    additive float, as torch's scaled_dot_product_attention takes it. Returns [B, N] float32.
    """
    logits = torch.matmul(q[:, :, :1, :].float(), k.float().transpose(-1, -2)) * scale  # [B, H, 1, N]
    row = None if mask is None else mask[..., :1, :]
    return torch.softmax(masked_logits(logits, row), dim=-1).mean(dim=1)[:, 0, :]


def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """EViT's fused token: the kept tokens, then one token Σ_{j dropped} score_j · x_j.

    x: [B, N, C], scores: [B, N] ([CLS] attention), index: [B, K] kept positions.
    Returns [B, K + 1, C].                                           (EViT, Sec. 3.3)
    """
    kept = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    dropped = torch.ones(scores.shape, dtype=x.dtype, device=x.device).scatter(1, index, 0.0)
    weights = (dropped * scores.to(x.dtype)).unsqueeze(-1)
    return torch.cat([kept, (x * weights).sum(1, keepdim=True)], dim=1)
