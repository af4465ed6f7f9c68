"""Triton kernels for the memory-bound tpc:: ops: gather, merge, and sparse attention.

They run on CUDA as the ``cuda`` implementations of the ops (see ``cuda.py``) and on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which
is how the tests check them against the reference implementations.

- ``gather_tokens``: one program per kept row and channel block; each reads its row index once
  and copies the row — one read and one write of the kept data, any float dtype.
- ``merge_tokens``: sources are sorted by destination slot (a segment per slot), so each
  program reduces its slot's sources in order: deterministic, one read of x, one write.
- ``sparse_attention``: queries attend to the keys/values named by a per-example index (or to
  every key), read row by row through the index (no gathered copy), with an online softmax
  (flash-attention style); a second pass over the keys in the same program recomputes the
  normalized probabilities and sums them over the block's queries: the attention mass each
  key receives, which scorers need, without materializing the [M, K] probabilities.
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


def gather_tokens(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B or 1, N, ...], index [B, K] -> [B, K, ...] (into ``out`` when given, contiguous)."""
    batch, kept = index.shape
    rest = x.shape[2:]
    xc = x.contiguous().reshape(x.shape[0], x.shape[1], -1)
    c = xc.shape[-1]
    if out is None:
        out = torch.empty(batch, kept, *rest, dtype=x.dtype, device=x.device)
    if out.numel():
        stride = 0 if x.shape[0] == 1 else xc.shape[1] * c
        block = gather_block(c)
        gather_kernel[(batch * kept, triton.cdiv(c, block))](xc, index.contiguous(), kept, c, stride, out, BLOCK_C=block)
    return out


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
def _key_offsets(idx_ptr, b, bh64, cols, col_ok, dims, dim_ok, N, K, D, HAS_INDEX: tl.constexpr):
    """Offsets of key/value rows ``cols`` (through the index, or directly) and their load mask."""
    if HAS_INDEX:
        key_rows = tl.load(idx_ptr + b * K + cols, mask=col_ok, other=0).to(tl.int64)
    else:
        key_rows = cols.to(tl.int64)
    return (bh64 * N + key_rows[:, None]) * D + dims[None, :], col_ok[:, None] & dim_ok[None, :]


@triton.jit
def sparse_attention_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, H, M, N, K, D, out_ptr, mass_ptr,
                            SCALE: tl.constexpr, HAS_INDEX: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B·H, cdiv(M, BLOCK_M)); q [B, H, M, D], k/v [B, H, N, D], idx [B, K] (HAS_INDEX) or
    every key, out [B, H, M, D], mass [B, H, cdiv(M, BLOCK_M), K] float32: this query block's
    share of each key's attention mass (summed over blocks by the caller, deterministically).
    Inputs, int32 scalars, outputs: the argument order of a TensorRT ahead-of-time plugin.
    HALF_DOT: fp16 operands go to tl.dot as they are (float32 accumulation); others as float32,
    multiplied at PRECISION ("ieee" for fp32 tensors; "tf32" holds bf16 values exactly)."""
    bh = tl.program_id(0)
    mblk = tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    dim_ok = dims < D
    q = tl.load(q_ptr + (bh64 * M + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    dot_type = tl.float16 if HALF_DOT else tl.float32
    q = q.to(dot_type)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):  # pass 1: online softmax (flash-attention style)
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        kv_off, kmask = _key_offsets(idx_ptr, b, bh64, cols, col_ok, dims, dim_ok, N, K, D, HAS_INDEX)
        k = tl.load(k_ptr + kv_off, mask=kmask, other=0.0).to(dot_type)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kmask, other=0.0).to(dot_type)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_type), v, input_precision=PRECISION)
        m_i = m_new
    tl.store(out_ptr + (bh64 * M + rows[:, None]) * D + dims[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    blocks = tl.num_programs(1)
    for start in range(0, K, BLOCK_K):  # pass 2: normalized probabilities, summed over this block's queries
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        kv_off, kmask = _key_offsets(idx_ptr, b, bh64, cols, col_ok, dims, dim_ok, N, K, D, HAS_INDEX)
        k = tl.load(k_ptr + kv_off, mask=kmask, other=0.0).to(dot_type)
        p = tl.exp(tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE - m_i[:, None]) / l_i[:, None]
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        tl.store(mass_ptr + (bh64 * blocks + mblk) * K + cols, tl.sum(p, 0), mask=col_ok)


def attention_block_d(head_dim: int) -> int:
    return _block(head_dim)


def dot_precision(dtype) -> str:
    return "ieee" if dtype in (torch.float32, "fp32") else "tf32"


def attention_block(head_dim: int) -> int:
    """Queries (and keys) per block: 32, or 16 for heads wider than 64 so a block's tiles fit
    in 48 KB of shared memory. tl.dot needs at least 16 on each side."""
    return 32 if attention_block_d(head_dim) <= 64 else 16


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q · k[index]ᵀ · scale) · v[index] (every key when ``index`` is None), and the
    attention mass each of those keys receives, summed over queries."""
    b, h, m, d = q.shape
    kept = k.shape[2] if index is None else index.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    partial = torch.empty(b, h, triton.cdiv(m, attention_block(d)), kept, dtype=torch.float32, device=q.device)
    launch_sparse_attention(q, k, v, index, scale, out, partial)
    return out, partial.sum(2)


def launch_sparse_attention(q, k, v, index, scale: float, out: torch.Tensor, partial: torch.Tensor) -> None:
    """The kernel into ``out`` [B, H, M, d] and ``partial`` [B, H, cdiv(M, attention_block(d)), K] (contiguous)."""
    b, h, m, d = q.shape
    n = k.shape[2]
    kept = partial.shape[-1]
    qc = q.contiguous()
    ic = qc if index is None else index.contiguous()  # any pointer: unread without an index
    if out.numel() and kept:
        sparse_attention_kernel[(b * h, partial.shape[2])](qc, k.contiguous(), v.contiguous(), ic, h, m, n, kept, d, out, partial,
                                                           SCALE=float(scale), HAS_INDEX=index is not None,
                                                           HALF_DOT=q.dtype == torch.float16, PRECISION=dot_precision(q.dtype),
                                                           BLOCK_M=attention_block(d), BLOCK_K=attention_block(d),
                                                           BLOCK_D=attention_block_d(d))
