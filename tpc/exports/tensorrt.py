"""Lowering to a serialized TensorRT engine (``engine.plan``), extra ``tpc[tensorrt]``.

The graph is cast to the requested precision (TensorRT 11 builds strongly typed networks
only: the ONNX's types are the engine's), lowered to ONNX with ``gather_tokens`` and
``sparse_attention`` as nodes for tpc's ahead-of-time plugins
(:mod:`tpc.exports.tensorrt_plugins`), checked on the CPU for what TensorRT's parser takes
(:mod:`tpc.exports.tensorrt_compat`), parsed, and built with one optimization profile
spanning ``batch=(min, opt, max)``. The engine is run on the GPU against the torch graph in
the same precision on the example inputs before it is written, atomically. Without TensorRT
or a CUDA GPU this says which is missing and writes nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from torch import fx

from tpc.errors import TpcError
from tpc.exports.atomic import atomic_output
from tpc.exports.checks import CheckResult, check_artifact
from tpc.exports.onnx import KEPT, to_onnx, with_decision_outputs
from tpc.capture import length_range
from tpc.exports.tensorrt_compat import tensorrt_problems

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIE_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}  # near-tie band of a pruning decision, relative
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def require_tensorrt():
    """The tensorrt module, or one clear error naming what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TpcError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install 'tpc[tensorrt]'` "
            "(TensorRT 10.9 or newer); nothing was written"
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


def cast_inputs(inputs: tuple, precision: str) -> tuple:
    dtype = PRECISIONS[precision]
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def in_precision(gm: fx.GraphModule, inputs: tuple, precision: str) -> tuple[fx.GraphModule, tuple]:
    """A copy of the graph and its float inputs in ``precision``; the user's graph is left as it is."""
    if precision == "fp32":
        return gm, inputs
    return copy.deepcopy(gm).to(PRECISIONS[precision]), cast_inputs(inputs, precision)


def engine_onnx(gm: fx.GraphModule, inputs: tuple) -> onnx.ModelProto:
    """The ONNX an engine is built from: tpc's plugin nodes, refused here if TensorRT's parser would refuse it."""
    model = to_onnx(gm, inputs, plugins=True)
    problems = tensorrt_problems(model)
    if problems:
        raise TpcError(f"TensorRT's ONNX parser would refuse this model: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return model


def with_kept_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The engine's model: the kept indices of each pruning step as outputs ``tpc_kept_<i>`` after
    its own. The engine check compares them with the torch graph's decisions (a near-tie may go
    either way in half precision); users get which tokens each step kept."""
    return with_decision_outputs(model)[0]


def _network_flags(trt) -> int:
    flags = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):  # both exist from TensorRT 10.9
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def build_engine(onnx_bytes: bytes, input_shapes: list[tuple[int, ...]], batch: tuple[int, int, int]) -> bytes:
    trt = require_tensorrt()
    import tpc.exports.tensorrt_plugins  # noqa: F401  (registers the plugins the parser looks up)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
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
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TpcError("TensorRT could not build an engine for this model (see the TensorRT log above)")
    return bytes(plan)


def run_engine(plan: bytes, inputs: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run a serialized engine once on ``inputs``: (model outputs, kept indices per pruning step), on the CPU."""
    names, values = engine_runner(plan, inputs)()
    kept = sorted((int(n[len(KEPT):]), v.cpu()) for n, v in zip(names, values) if n.startswith(KEPT))
    return [v.cpu() for n, v in zip(names, values) if not n.startswith(KEPT)], [v for _, v in kept]


def engine_runner(plan: bytes, inputs: tuple):
    """A callable that runs the engine on ``inputs`` (bound once, on the GPU): (output names, outputs)."""
    trt = require_tensorrt()
    import tpc.exports.tensorrt_plugins  # noqa: F401  (a plan built with JIT plugins needs them registered)

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    feeds = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    device_inputs = [x.detach().cuda().contiguous() for x in inputs]
    for name, x in zip(feeds, device_inputs):
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
    out_names, outputs = [], []
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                     trt.int64: torch.int64, trt.int32: torch.int32}[engine.get_tensor_dtype(name)]
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            out_names.append(name)
            outputs.append(out)
    stream = torch.cuda.current_stream()

    def run() -> tuple[list[str], list[torch.Tensor]]:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out_names, outputs

    return run


def graph_engine(gm: fx.GraphModule, inputs: tuple, batch: tuple[int, int, int], precision: str) -> tuple[bytes, fx.GraphModule]:
    """A plan for ``gm`` in ``precision``, with the kept indices as extra outputs; and the graph it was built from."""
    typed_gm, typed_inputs = in_precision(gm, inputs, precision)
    model = with_kept_outputs(engine_onnx(typed_gm, typed_inputs))
    return build_engine(model.SerializeToString(), [tuple(x.shape) for x in typed_inputs], batch), typed_gm


def write_engine(gm: fx.GraphModule, inputs: tuple, path: Path, batch=None, precision: str = "fp32",
                 check_batches: list[tuple] | None = None) -> CheckResult | None:
    if length_range(gm) is not None:
        raise TpcError("a TensorRT engine needs a fixed sequence length (TopK takes a constant K, and this graph computes "
                       "K from the length): compile with --seq-len N (seq_len=N) for a .plan, or write .onnx/.pt2, "
                       "which take any length")
    plan, typed_gm = graph_engine(gm, inputs, parse_batch(batch, int(inputs[0].shape[0])), precision)
    result = None
    with atomic_output(path, len(plan)) as tmp:
        tmp.write_bytes(plan)
        if check_batches:
            typed_batches = [cast_inputs(b, precision) for b in check_batches]
            result = check_artifact(typed_gm, lambda batch_inputs: run_engine(plan, batch_inputs), typed_batches,
                                    f"engine {path.name}", tol=TOLERANCE[precision], tie_rtol=TIE_RTOL[precision])
    return result
