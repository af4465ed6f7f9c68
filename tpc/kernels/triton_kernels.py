"""Triton kernels for the memory-bound tpc:: ops: gather, merge, and sparse attention.

They run on CUDA as the ``cuda`` implementations of the ops (see ``cuda.py``) and on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which
is how the tests check them against the reference implementations.

- ``gather_tokens``: one program per kept row and channel block; each reads its row index once
  and copies the row — one read and one write of the kept data, any float dtype.
- ``merge_tokens``: sources are sorted by destination slot (a segment per slot), so each
  program reduces its slot's sources in order: deterministic, one read of x, one write.
- ``sparse_attention``: queries attend to the keys/values named by a per-example index, read
  row by row through the index (no gathered copy), with an online softmax (flash-attention
  style); a second kernel recomputes the probabilities per key block and sums them over
  queries: the attention mass each kept key receives, which scorers need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block(n: int, cap: int = 128) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def gather_kernel(x_ptr, idx_ptr, K, C, x_batch_stride, out_ptr, BLOCK_C: tl.constexpr):
    """Grid (B·K, cdiv(C, BLOCK_C)). Arguments are inputs, int32 scalars, outputs, in that order:
    the launch contract of a TensorRT ahead-of-time plugin, so the same kernel serves both."""
    row = tl.program_id(0)
    cblk = tl.program_id(1)
    b = (row // K).to(tl.int64)
    i = tl.load(idx_ptr + row).to(tl.int64)
    offs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < C
    vals = tl.load(x_ptr + b * x_batch_stride + i * C + offs, mask=m)
    tl.store(out_ptr + row.to(tl.int64) * C + offs, vals, mask=m)


def gather_block(channels: int) -> int:
    return _block(channels, 1024)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B or 1, N, ...], index [B, K] -> [B, K, ...]."""
    batch, kept = index.shape
    rest = x.shape[2:]
    xc = x.contiguous().reshape(x.shape[0], x.shape[1], -1)
    c = xc.shape[-1]
    out = torch.empty(batch, kept, c, dtype=x.dtype, device=x.device)
    if out.numel():
        stride = 0 if x.shape[0] == 1 else xc.shape[1] * c
        block = gather_block(c)
        gather_kernel[(batch * kept, triton.cdiv(c, block))](xc, index.contiguous(), kept, c, stride, out, BLOCK_C=block)
    return out.reshape(batch, kept, *rest)


@triton.jit
def _merge_kernel(x_ptr, w_ptr, order_ptr, start_ptr, out_ptr, N, COUNT, C, MEAN: tl.constexpr, BLOCK_C: tl.constexpr):
    slot_row = tl.program_id(0)
    cblk = tl.program_id(1)
    b = slot_row // COUNT
    offs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < C
    slot = slot_row - b * COUNT
    begin = tl.load(start_ptr + b * (COUNT + 1) + slot)
    end = tl.load(start_ptr + b * (COUNT + 1) + slot + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    total = 0.0
    for j in range(begin, end):
        n = tl.load(order_ptr + b * N + j).to(tl.int64)
        w = tl.load(w_ptr + b * N + n).to(tl.float32)
        acc += w * tl.load(x_ptr + (b * N + n) * C + offs, mask=m, other=0.0).to(tl.float32)
        total += w
    if MEAN:
        acc = acc / tl.maximum(total, 1e-12)
    tl.store(out_ptr + slot_row.to(tl.int64) * C + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def merge_tokens(x: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, count: int,
                 mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold x [B, N, C] into ``count`` slots by ``assign`` [B, N], weighted by ``weights``."""
    b, n, c = x.shape
    order = torch.sort(assign, dim=1, stable=True).indices.contiguous()  # sources grouped by slot
    per_slot = torch.zeros(b, count, dtype=torch.int64, device=x.device).scatter_add_(1, assign, torch.ones_like(assign))
    starts = torch.cat([per_slot.new_zeros(b, 1), per_slot.cumsum(1)], 1).contiguous()  # [B, count + 1]
    w = weights.to(torch.float32).contiguous()
    totals = torch.zeros(b, count, dtype=torch.float32, device=x.device).scatter_add_(1, assign, w)
    out = torch.empty(b, count, c, dtype=x.dtype, device=x.device)
    if out.numel():
        block = _block(c, 1024)
        _merge_kernel[(b * count, triton.cdiv(c, block))](x.contiguous(), w, order, starts, out, n, count, c,
                                                          MEAN=mean, BLOCK_C=block)
    return out, totals


@triton.jit
def _sparse_attention_fwd(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, m_ptr, l_ptr,
                          H, M, N, K, D, scale,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    mblk = tl.program_id(1)
    b = bh // H
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    dim_ok = dims < D
    q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        key_rows = tl.load(idx_ptr + b * K + cols, mask=col_ok, other=0).to(tl.int64)
        kv_off = (bh.to(tl.int64) * N + key_rows[:, None]) * D + dims[None, :]
        kmask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kmask, other=0.0)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (bh * M + rows[:, None]) * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(m_ptr + bh * M + rows, m_i, mask=row_ok)
    tl.store(l_ptr + bh * M + rows, l_i, mask=row_ok)


@triton.jit
def _sparse_attention_mass(q_ptr, k_ptr, idx_ptr, m_ptr, l_ptr, mass_ptr,
                           H, M, N, K, D, scale,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    kblk = tl.program_id(1)
    b = bh // H
    cols = kblk * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < K
    dim_ok = dims < D
    key_rows = tl.load(idx_ptr + b * K + cols, mask=col_ok, other=0).to(tl.int64)
    k = tl.load(k_ptr + (bh.to(tl.int64) * N + key_rows[:, None]) * D + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    mass = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.load(m_ptr + bh * M + rows, mask=row_ok, other=0.0)
        l_i = tl.load(l_ptr + bh * M + rows, mask=row_ok, other=1.0)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        p = tl.exp(s - m_i[:, None]) / l_i[:, None]
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        mass += tl.sum(p, 0)
    tl.store(mass_ptr + bh * K + cols, mass, mask=col_ok)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q · k[index]ᵀ · scale) · v[index], and the attention mass of each indexed key."""
    b, h, m, d = q.shape
    n = k.shape[2]
    kept = index.shape[1]
    qc, kc, vc, ic = q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous()
    out = torch.empty_like(qc)
    m_stat = torch.empty(b, h, m, dtype=torch.float32, device=q.device)
    l_stat = torch.empty_like(m_stat)
    mass = torch.empty(b, h, kept, dtype=torch.float32, device=q.device)
    block_d = _block(d)
    block_m, block_k = 32, 32
    _sparse_attention_fwd[(b * h, triton.cdiv(m, block_m))](qc, kc, vc, ic, out, m_stat, l_stat, h, m, n, kept, d, scale,
                                                            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d)
    _sparse_attention_mass[(b * h, triton.cdiv(kept, block_k))](qc, kc, ic, m_stat, l_stat, mass, h, m, n, kept, d, scale,
                                                               BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d)
    return out, mass
