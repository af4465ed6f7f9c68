"""The pruned VLM prefill as a ``.pt2`` program or an ``.onnx`` model; TensorRT is refused.

Both are re-exported from the rewritten graph with a symbolic batch and prompt length,
written to a temporary file, checked against the graph (tpc's artifact check) on the example
inputs' first example and on the whole batch, then renamed into place. ONNX: the ``tpc::``
ops translated by :mod:`tpc.exports.onnx_ops` and :mod:`tpc.vlm.onnx_ops`; outputs at
padding positions are not compared (see ``real_positions``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.exports.atomic import check_output_path
from tpc.exports.checks import CheckResult, write_checked_program
from tpc.exports.onnx import program_to_onnx, write_checked_onnx
from tpc.vlm.inputs import layer_valid
from tpc.vlm.onnx_ops import ALL_TRANSLATIONS



def save_prefill(module, path, check: bool = True) -> CheckResult | None:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".plan":
        raise TpcError(f"{str(path)!r}: TensorRT engines are written for encoders only; write a pruned VLM's prefill "
                       "as .pt2 or .onnx")
    if suffix not in (".pt2", ".onnx"):
        raise TpcError(f"unknown artifact type {path.suffix or '(none)'!r} for {str(path)!r}: a pruned VLM is "
                       "written as .pt2 or .onnx (its prefill)")
    check_output_path(path)
    program = _program(module)
    inputs = [module.family.first_example(module.example_inputs), module.example_inputs]  # an example, the batch
    if suffix == ".onnx":
        # as for encoders: a near-tie the two backends decide differently is replayed
        return write_checked_onnx(to_onnx(module, program), path, "the pruned prefill", module.gm,
                                  inputs if check else None,
                                  compared=lambda args, ref: real_positions(module, args, ref))
    return write_checked_program(program, path, module.gm, inputs if check else None)


def _program(module) -> torch.export.ExportedProgram:
    dynamic = module.family.dynamic_shapes(module.example_inputs, module.visual, module.fewest_text_tokens)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(module.gm, module.example_inputs, dynamic_shapes=dynamic)
        except Exception as err:  # the prefill was captured before tpc rewrote it: failing now is tpc's bug
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TpcInternalError(f"internal error: torch.export could not re-export the pruned prefill: "
                                   f"{type(err).__name__}: {first}; {REPORT}") from err


def to_onnx(module, program: torch.export.ExportedProgram | None = None):
    """The pruned prefill as an ONNX model (opset 18; symbolic batch and prompt length)."""
    program = program or _program(module)
    return program_to_onnx(program, module.example_inputs, ALL_TRANSLATIONS)


def real_positions(module, args: tuple, outputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Per prefill output, the elements at real prompt tokens (None: every element).

    A left-padded prompt's padding tokens attend to no key (causal and padding masks), so
    their hidden states — the logits and the keys and values cached at those positions after
    the first layer — are unspecified: torch and ONNX Runtime fill such rows differently, and
    no real token reads them. The kept positions (integers) are compared whole.
    """
    n = module.spec.num_layers
    kept = list(outputs[1 + 2 * n:])
    valid = layer_valid(args[2], module.stages, kept, n)
    logits = valid[-1][:, :, None].expand(outputs[0].shape)
    cache = [valid[i // 2][:, None, :, None].expand(outputs[1 + i].shape) for i in range(2 * n)]
    return [logits, *cache, *([None] * len(kept))]
