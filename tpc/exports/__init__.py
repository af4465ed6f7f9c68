"""Lowering: the rewritten graph as an ONNX file, an ONNX Runtime session, a .pt2 program,
or (where TensorRT is installed) a TensorRT engine. Every artifact is checked against the
torch module it came from before it is written, and written atomically."""

from __future__ import annotations

from pathlib import Path

import onnx as onnx_lib  # plain `onnx` here would be shadowed by the tpc.exports.onnx submodule
import torch
from torch import nn

from tpc.capture import capture, export_program, is_token_input, length_range
from tpc.compiled import TpcModule
from tpc.errors import TpcError
from tpc.exports.atomic import atomic_output, check_output_path, write_bytes
from tpc.exports.checks import CheckResult, check_artifact, run_graph
from tpc.exports.onnx import check_onnx, to_onnx
from tpc.exports.onnxruntime import OrtModule
from tpc.exports.tensorrt import PRECISIONS, parse_batch, require_tensorrt, write_engine
from tpc.pt2 import load_program, program_bytes

SUFFIXES = (".onnx", ".pt2", ".plan")


def check_batches(inputs: tuple, gm=None) -> list[tuple]:
    """The example batch and its first example alone: every artifact must accept both. When
    ``gm`` has a symbolic sequence length, also the example batch cut to about half its length
    (every token input truncated): one artifact must serve every length."""
    first = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
    batches = [first, inputs]
    lengths = length_range(gm) if gm is not None else None
    if lengths is not None:
        length = next(x.shape[1] for x in inputs if is_token_input(x))
        short = max(lengths[0], (length + 1) // 2)
        if short < length:
            batches.append(tuple(x[:, :short] if is_token_input(x) else x for x in inputs))
    return batches


def _graph_and_inputs(module: nn.Module, example_inputs):
    inputs = example_inputs if example_inputs is not None else getattr(module, "example_inputs", None)
    if inputs is None:
        raise TpcError(f"pass example_inputs to export a {type(module).__name__}")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    gm = module.graph_module if isinstance(module, TpcModule) else capture(module, inputs)
    return gm, inputs


def to_onnxruntime(module: nn.Module, example_inputs=None, threads: int | None = None) -> OrtModule:
    """Export to ONNX, check in ONNX Runtime, and return the session as a module."""
    gm, inputs = _graph_and_inputs(module, example_inputs)
    model = to_onnx(gm, inputs)
    check_onnx(model, gm, check_batches(inputs, gm), "ONNX Runtime session")
    ort_module = OrtModule(model.SerializeToString(), threads=threads, report=getattr(module, "report", None))
    ort_module.example_inputs = inputs
    return ort_module


def check_target(path: Path, batch=None, precision: str = "fp32") -> str:
    """Fail before any work when ``path`` cannot receive an artifact; returns its suffix."""
    check_output_path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TpcError(f"unknown artifact type {path.suffix or '(none)'!r} for {str(path)!r}: use .onnx, .pt2 or .plan")
    if suffix != ".plan" and (batch is not None or precision != "fp32"):
        raise TpcError(f"--batch and --precision (batch=, precision=) set a TensorRT engine's profile and precision: "
                       f"they do not apply to {suffix}; drop them, or write a .plan")
    if suffix == ".plan":
        if precision not in PRECISIONS:
            raise TpcError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        require_tensorrt()
        parse_batch(batch, 2)
    return suffix


def write_artifact(module: nn.Module, path: Path, example_inputs=None, check: bool = True, batch=None,
                   precision: str = "fp32") -> CheckResult | None:
    """Write ``module`` as .onnx, .pt2 or .plan (TensorRT; ``batch`` = min,opt,max and ``precision``)."""
    suffix = check_target(path, batch, precision)
    if suffix == ".plan":
        gm, inputs = _graph_and_inputs(module, example_inputs)
        return write_engine(gm, inputs, path, batch, precision, check_batches(inputs, gm) if check else None)
    if isinstance(module, OrtModule):
        if suffix != ".onnx":
            raise TpcError("an ONNX Runtime module can only be written as .onnx")
        write_bytes(path, module.onnx_bytes)
        return None
    gm, inputs = _graph_and_inputs(module, example_inputs)
    result = None
    if suffix == ".onnx":
        data = to_onnx(gm, inputs).SerializeToString()
        with atomic_output(path, len(data)) as tmp:
            tmp.write_bytes(data)
            if check:
                result = check_onnx(onnx_lib.load_from_string(data), gm, check_batches(inputs, gm), f"ONNX file {path.name}")
    else:
        # Serialized in memory, written by Python: the archive's root folder is "archive" whatever the
        # file is called (same inputs, same bytes), and a full disk is an OSError, not a C++ abort.
        data = program_bytes(export_program(gm, inputs, rewritten_by_tpc=True))
        with atomic_output(path, len(data)) as tmp:
            tmp.write_bytes(data)
            if check:
                loaded = load_program(tmp, written_by_tpc=True).module()

                def run(batch):
                    outs, replay = run_graph(loaded, batch)
                    return outs, replay.decisions

                result = check_artifact(gm, run, check_batches(inputs, gm), f"program {path.name}")
    return result


__all__ = ["OrtModule", "check_batches", "check_target", "to_onnx", "to_onnxruntime", "write_artifact"]
