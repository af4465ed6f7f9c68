"""Registers the Triton kernels as the CUDA implementations of the memory-bound tpc:: ops.

Only on machines with CUDA: elsewhere Triton is never imported and the reference
implementations serve every device.
"""

from __future__ import annotations

import torch


def register() -> None:
    if not torch.cuda.is_available():
        return
    from tpc.kernels import triton_kernels as tk

    torch.library.register_kernel("tpc::gather_tokens", "cuda", tk.gather_tokens)
    torch.library.register_kernel("tpc::merge_tokens", "cuda", tk.merge_tokens)
    torch.library.register_kernel("tpc::sparse_attention", "cuda", tk.sparse_attention)
