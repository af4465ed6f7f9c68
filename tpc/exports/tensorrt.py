"""Lowering to a serialized TensorRT engine (``engine.plan``), extra ``tpc[tensorrt]``.

The ONNX lowering (standard ops only) is checked on the CPU for what TensorRT's parser
takes (:mod:`tpc.exports.tensorrt_compat`), parsed by TensorRT's ONNX parser, and built with
one optimization profile spanning ``batch=(min, opt, max)`` at the requested precision. The
engine is run on the GPU against the torch module on the example inputs before it is written,
atomically. Without TensorRT or a CUDA GPU this says which is missing and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.exports.atomic import atomic_output
from tpc.exports.checks import CheckResult, check_artifact
from tpc.exports.onnx import to_onnx
from tpc.exports.tensorrt_compat import tensorrt_problems

PRECISIONS = ("fp32", "fp16", "bf16")


def require_tensorrt():
    """The tensorrt module, or one clear error naming what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TpcError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install 'tpc[tensorrt]'` "
            "(TensorRT 10.8 or newer); nothing was written"
        ) from None
    if not torch.cuda.is_available():
        raise TpcError("no CUDA GPU is visible: a TensorRT engine is built on the GPU it will run on; nothing was written")
    return trt


def parse_batch(text, example_batch: int) -> tuple[int, int, int]:
    if text is None:
        return 1, max(1, example_batch), max(32, example_batch)
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise TpcError(f"--batch for an engine takes min,opt,max with 1 <= min <= opt <= max, not {text!r}")
    return values


def build_engine(onnx_bytes: bytes, input_shapes: list[tuple[int, ...]], batch: tuple[int, int, int], precision: str):
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TpcError(f"TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        rest = input_shapes[i][1:]
        profile.set_shape(network.get_input(i).name, (batch[0], *rest), (batch[1], *rest), (batch[2], *rest))
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TpcError("TensorRT could not build an engine for this model (see the TensorRT log above)")
    return bytes(plan)


def run_engine(plan: bytes, inputs: tuple) -> list[torch.Tensor]:
    """Run a serialized engine once on ``inputs``; outputs on the CPU."""
    return [o.cpu() for o in engine_runner(plan, inputs)()]


def engine_runner(plan: bytes, inputs: tuple):
    """A callable that runs the engine on ``inputs`` (bound once, on the GPU) and returns its outputs."""
    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    feeds = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    device_inputs = [x.detach().cuda().contiguous() for x in inputs]
    for name, x in zip(feeds, device_inputs):
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
    outputs = []
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                     trt.int64: torch.int64, trt.int32: torch.int32}[engine.get_tensor_dtype(name)]
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
    stream = torch.cuda.current_stream()

    def run() -> list[torch.Tensor]:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return outputs

    return run


def write_engine(gm: fx.GraphModule, inputs: tuple, path: Path, batch=None, precision: str = "fp32",
                 check_batches: list[tuple] | None = None) -> CheckResult | None:
    sizes = parse_batch(batch, int(inputs[0].shape[0]))
    model = to_onnx(gm, inputs)
    problems = tensorrt_problems(model)
    if problems:
        raise TpcError(f"TensorRT's ONNX parser would refuse this model: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    plan = build_engine(model.SerializeToString(), [tuple(x.shape) for x in inputs], sizes, precision)
    tol = 1e-3 if precision == "fp32" else 5e-2
    result = None
    with atomic_output(path) as tmp:
        tmp.write_bytes(plan)
        if check_batches:
            result = check_artifact(gm, lambda batch_inputs: (run_engine(plan, batch_inputs), None), check_batches,
                                    f"engine {path.name}", tol=tol)
    return result
