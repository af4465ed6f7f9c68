"""The fast lane (`pytest -m "not slow"`, for every edit) against the full run (the README's test
command): a parametrized test runs its first case in both and the rest in the full run only. And
which tests share a worker."""

from __future__ import annotations

import pytest


def first_fast(values) -> list:
    """``values`` as parametrize cases, all but the first marked slow."""
    values = list(values)
    return [values[0], *(pytest.param(v, marks=pytest.mark.slow) for v in values[1:])]


# pytestmark of the files that test the same exported ONNX files (conftest's `exported`, exported once
# per worker): with `--dist loadgroup` (conftest's default) they run on one worker, which exports each once
ONNX_ARTIFACTS = pytest.mark.xdist_group("onnx_artifacts")
