"""TensorRT plugins for the tpc:: ops an engine carries: ``gather_tokens``, ``sparse_attention``.

Needs ``tensorrt``; importing this module registers the plugins.

Quickly deployable Python plugins (``tensorrt.plugin``, TensorRT 10.9+): ``register`` gives the
output shape, ``autotune`` the types, and ``aot_impl`` the kernel — tpc's Triton kernel compiled
to PTX for the GPU the engine is built on, which TensorRT bakes into the plan, so ``engine.plan``
runs in any TensorRT runtime (trtexec, C++) without Python or tpc. ``impl`` is the same kernel
launched from Python, for TensorRT builds that prefer just-in-time plugins.

The engine's ONNX (:mod:`tpc.exports.onnx_plugins`) names each op as TensorRT's parser
expects: op type = plugin name, attributes ``plugin_namespace="tpc"`` and ``aot=1``.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as classes.
import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from tpc.kernels import aot

AotKernel = tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]  # name, PTX, launch, int32 scalars
TRITON_TYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int32: "i32", trt.int64: "i64"}


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _product(exprs) -> trtp.ShapeExpr | int:
    total = 1
    for e in exprs:
        total = e * total
    return total


@trtp.register("tpc::gather_tokens")
def gather_tokens_desc(x: trtp.TensorDesc, index: trtp.TensorDesc) -> trtp.TensorDesc:
    """x [B or 1, N, ...], index [B, K] -> [B, K, ...] (see tpc::gather_tokens)."""
    rest = [x.shape_expr[i] for i in range(2, x.ndim)]
    return trtp.from_shape_expr((index.shape_expr[0], index.shape_expr[1], *rest), dtype=x.dtype)


@trtp.autotune("tpc::gather_tokens")
def gather_tokens_autotune(x: trtp.TensorDesc, index: trtp.TensorDesc, outputs) -> list[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT64, FP32|FP16|BF16", "LINEAR")]


@trtp.aot_impl("tpc::gather_tokens")
def gather_tokens_aot(x: trtp.TensorDesc, index: trtp.TensorDesc, outputs, tactic: int) -> AotKernel:
    from tpc.kernels.triton_kernels import gather_block

    channels = _product([x.shape_expr[i] for i in range(2, x.ndim)])
    static = channels if isinstance(channels, int) else (channels.constant_value() if channels.is_constant else None)
    block = gather_block(static) if static is not None else 1024
    kernel = aot.gather_ptx(TRITON_TYPES[x.dtype], TRITON_TYPES[index.dtype], block, _arch())
    batch, kept = index.shape_expr[0], index.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = batch * kept
    launch.grid_y = trtp.cdiv(channels, block) if not isinstance(channels, int) else -(-channels // block)
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared
    # A batch of one in x is broadcast: its batch stride is 0 (min(B_x - 1, 1) = 0 exactly then).
    stride = x.shape_expr[1] * channels * trtp.min(x.shape_expr[0] - 1, 1)
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(kept), trtp.SymInt32(channels), trtp.SymInt32(stride)])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


@trtp.impl("tpc::gather_tokens")
def gather_tokens_impl(x: trtp.Tensor, index: trtp.Tensor, outputs, stream: int) -> None:
    from tpc.kernels.triton_kernels import gather_tokens

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        gather_tokens(torch.as_tensor(x, device="cuda"), torch.as_tensor(index, device="cuda"),
                      out=torch.as_tensor(outputs[0], device="cuda"))



def _attention_block(q: trtp.TensorDesc) -> int:
    from tpc.kernels.triton_kernels import attention_block

    width = q.shape_expr[3]
    if width.is_fake:  # TensorRT asks for output types with placeholder shapes: the value is unused
        return attention_block(64)
    return attention_block(width.constant_value() if width.is_constant else 128)


@trtp.register("tpc::sparse_attention")
def sparse_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, index: trtp.TensorDesc,
                          scale: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    """q [B, H, M, d], k/v [B, H, N, d], index [B, K] -> (out [B, H, M, d], mass per query block [B, H, blocks, K])."""
    blocks = trtp.cdiv(q.shape_expr[2], _attention_block(q))
    mass = trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], blocks, index.shape_expr[1]), dtype=trt.float32)
    return q.like(), mass


@trtp.autotune("tpc::sparse_attention")
def sparse_attention_autotune(q, k, v, index, outputs) -> list[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, INT64, FP32|FP16|BF16, FP32", "LINEAR")]


@trtp.aot_impl("tpc::sparse_attention")
def sparse_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, index: trtp.TensorDesc,
                         scale: float, outputs, tactic: int) -> AotKernel:
    width = q.shape_expr[3]
    if not width.is_constant:
        raise ValueError("tpc::sparse_attention needs a head width known when the engine is built")
    kernel = aot.sparse_attention_ptx(TRITON_TYPES[q.dtype], TRITON_TYPES[index.dtype], scale, width.constant_value(), _arch())
    b, h, m, _ = q.shape_expr
    launch = trtp.KernelLaunchParams()
    launch.grid_x = b * h
    launch.grid_y = trtp.cdiv(m, _attention_block(q))
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared
    sizes = (h, m, k.shape_expr[2], index.shape_expr[1], width)
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in sizes])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


@trtp.impl("tpc::sparse_attention")
def sparse_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, index: trtp.Tensor, scale: float,
                          outputs, stream: int) -> None:
    from tpc.kernels.triton_kernels import launch_sparse_attention

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        cuda = [torch.as_tensor(t, device="cuda") for t in (q, k, v, index, outputs[0], outputs[1])]
        launch_sparse_attention(*cuda[:4], scale, cuda[4], cuda[5])
