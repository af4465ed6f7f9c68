"""Ahead-of-time compilation of tpc's Triton kernels to PTX, for TensorRT plugins.

TensorRT's ahead-of-time Python plugins (``tensorrt.plugin.aot_impl``) take a kernel as PTX
with its launch geometry and bake it into the engine, so the plan runs without Python. The
kernel's parameters must be its tensor inputs, then int32 scalars, then its outputs (the
kernels in :mod:`tpc.kernels.triton_kernels` are written that way). Compiling needs Triton
only, not a GPU, so what an engine will carry is checked on the CPU too.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FLOAT_TYPES = ("fp32", "fp16", "bf16")
INDEX_TYPES = ("i32", "i64")


@dataclass(frozen=True)
class PtxKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int  # bytes of shared memory per block
    params: tuple[str, ...]  # the PTX entry's parameter declarations, in order
    compiled: object = field(default=None, repr=False, compare=False)  # Triton's kernel: launchable where a GPU is

    @property
    def threads(self) -> int:
        return self.num_warps * 32


_ENTRY = r"(\.entry\s+{name}\s*\()(.*?)(\))"


def _entry_params(ptx: str, name: str) -> list[str]:
    match = re.search(_ENTRY.format(name=re.escape(name)), ptx, re.S)
    if match is None:
        raise RuntimeError(f"the PTX has no entry {name!r}")
    return [p.strip() for p in match.group(2).split(",") if p.strip()]


def trim_params(ptx: str, name: str, count: int) -> str:
    """The PTX with the entry's parameters cut to the first ``count``.

    Triton appends scratch-buffer pointers after the kernel's own parameters; a kernel that
    needs no scratch never reads them, and TensorRT passes exactly the inputs, scalars and
    outputs, so the entry must declare exactly those.
    """
    params = _entry_params(ptx, name)
    extra = [p.split()[-1] for p in params[count:]]
    body = ptx[ptx.index(params[-1]) + len(params[-1]):]
    used = [p for p in extra if re.search(rf"\b{re.escape(p)}\b", body)]
    if used:
        raise RuntimeError(f"kernel {name} reads its trailing parameters {used}; they cannot be cut")
    return re.sub(_ENTRY.format(name=re.escape(name)),
                  lambda m: m.group(1) + "\n\t" + ",\n\t".join(params[:count]) + "\n" + m.group(3), ptx, count=1, flags=re.S)


def _compile(fn, signature: dict[str, str], constexprs: dict, arch: int) -> PtxKernel:
    import triton
    from triton.backends.compiler import GPUTarget

    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("Triton's interpreter is on (TRITON_INTERPRET=1): it compiles nothing ahead of time")
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    meta = compiled.metadata
    scratch = getattr(meta, "global_scratch_size", 0) + getattr(meta, "profile_scratch_size", 0)
    if scratch:  # a TensorRT launch passes no scratch buffers
        raise RuntimeError(f"kernel {meta.name} needs {scratch} bytes of Triton scratch memory; TensorRT cannot give it")
    ptx = trim_params(compiled.asm["ptx"], meta.name, len(signature))
    return PtxKernel(meta.name, ptx, meta.num_warps, meta.shared, tuple(_entry_params(ptx, meta.name)), compiled)


def assemble(kernel: PtxKernel, arch: int) -> bytes:
    """The PTX through ptxas (bundled with Triton) for ``arch``: proof it is valid, and the cubin."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(kernel.ptx)
        done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ptxas refused {kernel.name}: {done.stderr.strip()}")
        return out.read_bytes()


@functools.lru_cache(maxsize=None)
def gather_ptx(dtype: str, index_dtype: str, block_c: int, arch: int) -> PtxKernel:
    """``gather_kernel`` for rows of ``dtype``, a ``index_dtype`` index, ``block_c`` channels per program,
    on compute capability ``arch`` (e.g. 90 for H100/H200)."""
    if dtype not in FLOAT_TYPES or index_dtype not in INDEX_TYPES:
        raise ValueError(f"gather_tokens takes {FLOAT_TYPES} rows and {INDEX_TYPES} indices, not {dtype}/{index_dtype}")
    from tpc.kernels.triton_kernels import gather_kernel

    signature = {"x_ptr": f"*{dtype}", "idx_ptr": f"*{index_dtype}", "K": "i32", "C": "i32",
                 "x_batch_stride": "i32", "out_ptr": f"*{dtype}"}
    return _compile(gather_kernel, signature, {"BLOCK_C": block_c}, arch)


SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without an opt-in attribute


@functools.lru_cache(maxsize=None)
def sparse_attention_ptx(dtype: str, index_dtype: str, scale: float, head_dim: int, arch: int) -> PtxKernel:
    """``sparse_attention_kernel`` with an index, for ``dtype`` q/k/v/out, a fixed ``scale`` and head width."""
    if dtype not in FLOAT_TYPES or index_dtype not in INDEX_TYPES:
        raise ValueError(f"sparse_attention takes {FLOAT_TYPES} tensors and {INDEX_TYPES} indices, not {dtype}/{index_dtype}")
    from tpc.kernels.triton_kernels import attention_block, attention_block_d, dot_precision, sparse_attention_kernel

    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "idx_ptr": f"*{index_dtype}",
                 "H": "i32", "M": "i32", "N": "i32", "K": "i32", "D": "i32", "out_ptr": f"*{dtype}", "mass_ptr": "*fp32"}
    block = attention_block(head_dim)
    constexprs = {"SCALE": float(scale), "HAS_INDEX": True, "HALF_DOT": dtype == "fp16",
                  "PRECISION": dot_precision(dtype), "BLOCK_M": block, "BLOCK_K": block,
                  "BLOCK_D": attention_block_d(head_dim)}
    kernel = _compile(sparse_attention_kernel, signature, constexprs, arch)
    if kernel.shared > SHARED_LIMIT:
        raise RuntimeError(f"sparse_attention for head width {head_dim} needs {kernel.shared} bytes of shared memory")
    return kernel
