"""The ``random`` baseline: a seeded uniform random score per token and example.

The scores come from an integer hash of (example, token, seed) rather than from an RNG, so
the torch module, the ONNX graph (Mul/Add/Mod on int64) and any other backend draw exactly
the same tokens. Two rounds of an affine map followed by squaring modulo the Mersenne prime
2³¹−1 mix the inputs; every intermediate product stays below 2⁶² and never overflows int64.
"""

from __future__ import annotations

import torch

PRIME = 2**31 - 1
_A, _B, _C, _D = 1103515245, 12345, 2654435761 % PRIME, 1013904223


def hash_scores(batch: int, tokens: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """[batch, tokens] float32 scores in [0, 1), a pure function of (example, token, seed)."""
    pos = torch.arange(tokens, dtype=torch.int64, device=device).unsqueeze(0)
    row = torch.arange(batch, dtype=torch.int64, device=device).unsqueeze(1)
    h = (pos * _A + row * _B + (seed % PRIME) * _C + _D) % PRIME
    h = (h * h) % PRIME
    h = (h * _A + _D) % PRIME
    h = (h * h) % PRIME
    return h.to(torch.float32) / PRIME
