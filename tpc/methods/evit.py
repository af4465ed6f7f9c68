"""[CLS]-attention token scores (EViT, Liang et al., ICLR 2022; VTC-CLS, 2024).

EViT keeps the tokens the [CLS] token attends to most: with per-head attention
A_h = softmax(q_h kᵀ_h · s + bias), the score of token j is the head mean of the [CLS] row,

    score_j = 1/H · Σ_h A_h[0, j]                                   (EViT, Sec. 3.2)

Only the [CLS] row is computed (one query against N keys per head), so scoring costs
O(H·N·d) even when the model's attention never materializes A.
"""

from __future__ import annotations

import torch


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-mean attention of query 0 to every key.

    q, k: [B, H, N, d]. mask: broadcastable to [B, H, N, N], bool (True = may attend) or
    additive float, as torch's scaled_dot_product_attention takes it. Returns [B, N] float32.
    """
    logits = torch.matmul(q[:, :, :1, :].float(), k.float().transpose(-1, -2)) * scale  # [B, H, 1, N]
    if mask is not None:
        row = mask[..., :1, :]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, :]
