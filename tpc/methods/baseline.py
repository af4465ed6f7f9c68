"""The ``random`` baseline: a seeded uniform random score per token and example.

The scores come from an integer hash of (example, token, seed) rather than from an RNG, so
the torch module, the ONNX graph (Mul/Add/Mod on integers) and any other backend draw exactly
the same tokens. Each step is an affine map or a square modulo the prime 32749, so every
intermediate value stays below 2³¹: the hash gives the same numbers where a runtime narrows
int64 to int32 (TensorRT does).
"""

from __future__ import annotations

import torch

# The hash, written once here and once in ONNX ops (tpc.exports.onnx_ops.random_scores):
#   h = (A·token mod P + B·example mod P + seed_term(seed)) mod P, then h ← h² mod P,
#   h ← (A·h + D) mod P, h ← h² mod P; the score is h / P.
PRIME = 32749
A, B, C, D = 30011, 17389, 24571, 12347


def seed_term(seed: int) -> int:
    """The seed's part of the first hash step, (C·(seed mod P) + D) mod P: a Python int."""
    return ((seed % PRIME) * C + D) % PRIME


def hash_scores(batch: int, tokens: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """[batch, tokens] float32 scores in [0, 1), a pure function of (example, token, seed)."""
    pos = torch.arange(tokens, dtype=torch.int64, device=device).unsqueeze(0)
    row = torch.arange(batch, dtype=torch.int64, device=device).unsqueeze(1)
    h = ((pos * A) % PRIME + (row * B) % PRIME + seed_term(seed)) % PRIME
    h = (h * h) % PRIME
    h = (h * A + D) % PRIME
    h = (h * h) % PRIME
    return h.to(torch.float32) / PRIME
