"""The rewritten decode step as a ``.pt2`` program or an ``.onnx`` model (symbolic batch and cache length).

Both are re-exported from the rewritten graph (the step's inputs: input_ids, position_ids,
attention_mask, the flat ``past`` list of 2 × layers tensors, and for quest its layers' page
bounds, for dhsa their chunk summaries, whose count of pages or chunk slots is symbolic too),
written to a temporary file, read back and checked against the graph, then renamed into place.
The checks: batch 1 and 2 at one cache length, and batch 1 and a left-padded batch 2 at a longer
one (more pages for quest), so the file serves other batches and cache lengths than it was
exported at. ONNX: opset 18, the ``tpc::`` decode ops translated by :mod:`tpc.decode.onnx_ops`
(tidal's and quest's; dhsa's chunk ops have none yet, so its step is written as .pt2 only),
checked in ONNX Runtime. TensorRT is refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import onnx
import torch

from tpc.decode.capture import MAX_BATCH, MAX_CACHE, example_step, step_spec
from tpc.decode.onnx_ops import ALL_TRANSLATIONS
from tpc.decode.side import side_dims, side_inputs, unit
from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.exports.atomic import check_output_path
from tpc.exports.checks import CheckResult, write_checked_program
from tpc.exports.onnx import program_to_onnx, write_checked_onnx

ONNX_METHODS = ("tidal", "quest")  # the decode-time methods whose tpc:: ops have ONNX translations


def check_step_suffix(path, method: str | None = None) -> str:
    """The decode step is written as .pt2 or .onnx (``method``'s, when its ops have ONNX translations):
    anything else is refused (before any capture, in the CLI)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx" and method is not None and method not in ONNX_METHODS:
        raise TpcError(f"the {method} decode step is written as .pt2 only: its ops have no ONNX translation yet "
                       f"({' and '.join(ONNX_METHODS)} steps are written as .onnx too)")
    if suffix == ".plan":
        raise TpcError(f"{str(path)!r}: TensorRT engines are written for encoders only; write the decode step of a "
                       "decoder language model as .pt2 or .onnx")
    if suffix not in (".pt2", ".onnx"):
        raise TpcError(f"unknown artifact type {path.suffix or '(none)'!r} for {str(path)!r}: the decode step of a "
                       "decoder language model is written as .pt2 or .onnx")
    return suffix


def step_inputs(module, batch: int, length: int, padding: int = 0) -> tuple:
    """Inputs of one step of ``module`` at ``batch`` × ``length`` cached positions (random cache), the
    examples after the first left-padded by ``padding`` positions; quest's page bounds or dhsa's chunk
    summaries computed from the cache."""
    ids, positions, mask, past = example_step(module._model[0], batch=batch, length=length)
    mask[1:, :padding] = 0
    inputs = (ids + 3, positions, mask, past)
    return (*inputs, side_inputs(module.plan, past, mask)) if module.takes_bounds else inputs


def _lengths(module) -> tuple[int, int]:
    """The export's cache length and a longer one for the check. quest, dhsa: two pages or chunk slots at least,
    so their count is not 1 (torch.export would specialize it), and the longer one more of them."""
    page = unit(module.plan) if module.takes_bounds else 4
    first = max(12, page + 1)
    return first, first + page + 5


def _example(module) -> tuple:
    return step_inputs(module, 2, _lengths(module)[0])


def step_program(module) -> torch.export.ExportedProgram:
    """The rewritten step re-exported with a symbolic batch, cache length and (quest, dhsa) count of pages or
    chunk slots."""
    example = _example(module)
    batch, cache = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("cache", min=1, max=MAX_CACHE)
    dynamic = ({0: batch}, {0: batch}, {0: batch, 1: cache + 1},
               [{0: batch, 2: cache}] * (2 * step_spec(module._model[0])[0]))
    if module.takes_bounds:  # quest's page bounds, dhsa's chunk summaries
        dynamic = (*dynamic, side_dims(module.plan, batch))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(module.gm, example, dynamic_shapes=dynamic)
        except Exception as err:  # the step was captured before tpc rewrote it: failing now is tpc's bug
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TpcInternalError(f"internal error: torch.export could not re-export the rewritten decode step: "
                                   f"{type(err).__name__}: {first}; {REPORT}") from err


def check_inputs(module) -> list[tuple]:
    """Batch 1 and 2 at the export's cache length; batch 1 and a left-padded batch 2 at a longer one."""
    short, long = _lengths(module)
    return [step_inputs(module, 1, short), step_inputs(module, 2, short),
            step_inputs(module, 1, long), step_inputs(module, 2, long, padding=3)]


def step_to_onnx(module, program: torch.export.ExportedProgram | None = None) -> onnx.ModelProto:
    """The rewritten decode step as an ONNX model (opset 18; symbolic batch, cache length and page count)."""
    return program_to_onnx(program or step_program(module), _example(module), ALL_TRANSLATIONS)


def save_step(module, path, check: bool = True) -> CheckResult | None:
    path = Path(path)
    suffix = check_step_suffix(path, module.plan.method if module.plan is not None else None)
    check_output_path(path)
    program = step_program(module)
    inputs = check_inputs(module) if check else None
    if suffix == ".pt2":
        result = write_checked_program(program, path, module.gm, inputs)
    else:
        result = write_checked_onnx(step_to_onnx(module, program), path, "the decode step", module.gm, inputs)
    if result is None:
        return None
    return dataclasses.replace(result, lengths=tuple(int(i[3][0].shape[2]) for i in inputs), unit="cached positions")


