"""The pruned VLM prefill as a ``.pt2`` program; other artifact types are refused for now."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tpc.errors import TpcError, refusal_or_bug
from tpc.exports.atomic import atomic_output, check_output_path
from tpc.exports.checks import CheckResult, check_artifact
from tpc.pt2 import load_program


def save_prefill(module, path, check: bool = True) -> CheckResult | None:
    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise TpcError(f"a pruned VLM is written as .pt2 (its prefill program); {path.suffix or 'no suffix'} is not "
                       "supported for VLMs yet")
    check_output_path(path)
    dynamic = module.family.dynamic_shapes(module.example_inputs, module.visual)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module.gm, module.example_inputs, dynamic_shapes=dynamic)
        except Exception as err:  # one line for the user; tpc's own bugs are reported as such
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise refusal_or_bug(err, f"torch.export could not capture the pruned prefill: {first}") from err
    with atomic_output(path) as tmp:
        torch.export.save(program, str(tmp))
        if not check:
            return None
        loaded = load_program(tmp, written_by_tpc=True).module()

        def run(inputs):
            with torch.no_grad():
                return list(loaded(*inputs)), None

        inputs = [module.family.first_example(module.example_inputs), module.example_inputs]  # an example, the batch
        with torch.no_grad():  # tolerance from the outputs' dtype (wider for half precision), as for encoders
            return check_artifact(module.gm, run, inputs, "the written program")
