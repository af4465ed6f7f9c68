"""The Triton kernels against the reference ops, on the CPU through Triton's interpreter.

Triton decides between compiling and interpreting when it is imported, so these cases run in a
process of their own with TRITON_INTERPRET=1 (tests/test_triton_kernels.py starts it).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
    pytest.skip("run through tests/test_triton_kernels.py, in a fresh process with TRITON_INTERPRET=1",
                allow_module_level=True)

import tpc  # noqa: E402
from tpc.kernels import triton_kernels as tk  # noqa: E402
from tpc.methods import tome  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
G = torch.Generator().manual_seed(0)


def _index(b, n, k):
    return torch.stack([torch.sort(torch.randperm(n, generator=G)[:k]).values for _ in range(b)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, k, c, x_batch", [(2, 9, 1, 5, 2), (3, 9, 9, 24, 3), (2, 17, 6, 130, 1), (1, 5, 3, 3, 1)])
def test_gather_tokens(dtype, b, n, k, c, x_batch):
    x = torch.randn(x_batch, n, c, generator=G).to(dtype)
    index = _index(b, n, k)
    assert torch.equal(tk.gather_tokens(x, index), torch.ops.tpc.gather_tokens(x, index))


def test_gather_tokens_trailing_dims():
    x = torch.randn(2, 7, 3, 5, generator=G)
    index = _index(2, 7, 4)
    assert torch.equal(tk.gather_tokens(x, index), torch.ops.tpc.gather_tokens(x, index))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("b, n, r, c", [(2, 9, 3, 5), (3, 17, 8, 33), (1, 6, 0, 7), (2, 5, 2, 130)])
def test_merge_tokens(dtype, mean, b, n, r, c):
    x = torch.randn(b, n, c, generator=G).to(dtype)
    keys = torch.randn(b, n, 4, generator=G)
    _kept, assign = tome.bipartite_match(keys, r, 1)
    weights = torch.rand(b, n, generator=G) + 0.5
    got, got_w = tk.merge_tokens(x, weights, assign, n - r, mean)
    want, want_w = torch.ops.tpc.merge_tokens(x, weights, assign, n - r, mean)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_w, want_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, h, m, n, k, d", [(2, 2, 9, 9, 9, 16), (1, 3, 5, 40, 1, 8), (2, 1, 33, 50, 37, 24),
                                              (1, 2, 17, 17, 6, 20), (2, 2, 70, 70, 70, 64)])
@pytest.mark.parametrize("indexed", [True, False])
def test_sparse_attention(dtype, b, h, m, n, k, d, indexed):
    q = torch.randn(b, h, m, d, generator=G).to(dtype)
    kk = torch.randn(b, h, n, d, generator=G).to(dtype)
    v = torch.randn(b, h, n, d, generator=G).to(dtype)
    index = _index(b, n, k) if indexed else None
    got, mass = tk.sparse_attention(q, kk, v, index, d ** -0.5)
    want, want_mass = torch.ops.tpc.sparse_attention(q, kk, v, index, d ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, want_mass, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(mass.sum(-1), torch.full((b, h), float(m)), atol=1e-3, rtol=1e-3)
