"""TensorRT plugins for the tpc:: ops an engine carries (needs ``tensorrt``; importing registers them).

Quickly deployable Python plugins (``tensorrt.plugin``, TensorRT 10.9+): ``register`` gives the
output shape, ``autotune`` the types, and ``aot_impl`` the kernel — tpc's Triton kernel compiled
to PTX for the GPU the engine is built on, which TensorRT bakes into the plan, so ``engine.plan``
runs in any TensorRT runtime (trtexec, C++) without Python or tpc. ``impl`` is the same kernel
launched from Python, for TensorRT builds that prefer just-in-time plugins.

The engine's ONNX (:func:`tpc.exports.onnx.to_onnx` with ``plugins=True``) names each op as
TensorRT's parser expects: op type = plugin name, attributes ``plugin_namespace="tpc"`` and
``aot=1``.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from tpc.kernels import aot

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
def gather_tokens_aot(x: trtp.TensorDesc, index: trtp.TensorDesc, outputs, tactic: int):
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
        out = torch.as_tensor(outputs[0], device="cuda")
        out.copy_(gather_tokens(torch.as_tensor(x, device="cuda"), torch.as_tensor(index, device="cuda")))

