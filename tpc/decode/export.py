"""The rewritten decode step as a ``.pt2`` program (symbolic batch and cache length).

Re-exported from the rewritten graph, written to a temporary file, read back and checked
against the graph on a batch of two and on one example, then renamed into place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tpc.decode.capture import MAX_BATCH, MAX_CACHE, decoder_spec, example_step
from tpc.decode.side import side_dims, side_inputs, unit
from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.exports.atomic import check_output_path
from tpc.exports.checks import CheckResult, write_checked_program


def check_step_suffix(path) -> None:
    """The decode step is written as .pt2 only: anything else is refused (before any capture, in the CLI)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".plan"):
        raise TpcError(f"the decode step of a decoder language model is written as .pt2; {path.suffix} is not supported "
                       "for it (its ONNX export is not implemented)")
    if suffix != ".pt2":
        raise TpcError(f"unknown artifact type {path.suffix or '(none)'!r} for {str(path)!r}: the decode step of a "
                       "decoder language model is written as .pt2")


def save_step(module, path, check: bool = True) -> CheckResult | None:
    path = Path(path)
    check_step_suffix(path)
    check_output_path(path)
    model = module._model[0]
    # quest, dhsa: a cache of two pages or chunk slots at least, so their count is not 1 (torch.export would
    # specialize it)
    example = example_step(model, batch=2, length=max(12, unit(module.plan) + 1) if module.takes_bounds else 12)
    batch, cache = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("cache", min=1, max=MAX_CACHE)
    dynamic = ({0: batch}, {0: batch}, {0: batch, 1: cache + 1}, [{0: batch, 2: cache}] * (2 * decoder_spec(model)[0]))
    if module.takes_bounds:  # quest's page bounds, dhsa's chunk summaries
        example = (*example, side_inputs(module.plan, example[3], example[2]))
        dynamic = (*dynamic, side_dims(module.plan, batch))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module.gm, example, dynamic_shapes=dynamic)
        except Exception as err:  # the step was captured before tpc rewrote it: failing now is tpc's bug
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TpcInternalError(f"internal error: torch.export could not re-export the rewritten decode step: "
                                   f"{type(err).__name__}: {first}; {REPORT}") from err
    one = (example[0][:1], example[1][:1], example[2][:1], *([p[:1] for p in group] for group in example[3:]))
    return write_checked_program(program, path, module.gm, [one, example] if check else None)
