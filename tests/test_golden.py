"""Golden graph texts and outputs: the rewritten graph around every inserted node, and the
pruned outputs, pinned for each test model. Rewrite with `pytest --update-golden` and review
the diff like code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from models import TEST_MODELS
from specs import SPECS, parse_spec
from tpc.graph.printing import format_rewrites


GOLDEN = Path(__file__).parent / "golden"
CASES = {f"{name}_{spec}": (name, spec) for name in TEST_MODELS for spec in SPECS}
FIRST = next(iter(TEST_MODELS))  # the fast lane (-m "not slow") checks every method on the first model


def _compile(name, spec):
    factory, inputs, depth, _ = TEST_MODELS[name]
    method, options = parse_spec(spec)
    pm = tpc.compile(factory(), inputs(2), method=method, layers=[1, depth - 1], keep=[0.5, 0.7], options=options)
    return pm, inputs


def _check_text(path: Path, text: str, update: bool):
    if update:
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing: run pytest --update-golden and review it"
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"


@pytest.mark.slow
@pytest.mark.parametrize("case", [c if CASES[c][0] == FIRST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_golden_graph_and_outputs(case, update_golden):
    pm, inputs = _compile(*CASES[case])  # one compile per case for both the text and the numbers
    _check_text(GOLDEN / f"{case}.txt", format_rewrites(pm.graph_module), update_golden)
    with torch.no_grad():
        out = pm(*inputs(3, seed=11)).numpy()
    path = GOLDEN / f"{case}.npz"
    if update_golden:
        np.savez(path, output=out)
    assert path.exists(), f"{path.name} is missing: run pytest --update-golden"
    np.testing.assert_allclose(out, np.load(path)["output"], atol=1e-5, rtol=1e-5)
