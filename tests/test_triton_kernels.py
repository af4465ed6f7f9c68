"""The Triton kernels, interpreted on the CPU: tests/triton_interpreter_cases.py in a fresh
process with TRITON_INTERPRET=1 (Triton picks interpreting or compiling when it is imported,
and this test process has imported it already through torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _interpreted(*cases: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cases = cases or ("",)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(f"{TESTS / 'triton_interpreter_cases.py'}{c}" for c in cases)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)


def test_each_triton_kernel_matches_its_reference_op_in_the_interpreter():
    """One case of each kernel: the fast lane's check that the kernels still run."""
    r = _interpreted("::test_gather_tokens_trailing_dims", "::test_merge_tokens[2-9-3-5-True-dtype0]",
                     "::test_sparse_attention[True-2-2-9-9-9-16-dtype0]")
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_triton_kernels_match_the_reference_ops_in_the_interpreter():
    r = _interpreted()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-1000:]
