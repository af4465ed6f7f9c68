"""The Triton kernels, interpreted on the CPU: tests/triton_interpreter_cases.py in a fresh
process with TRITON_INTERPRET=1 (Triton picks interpreting or compiling when it is imported,
and this test process has imported it already through torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_triton_kernels_match_the_reference_ops_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton_interpreter_cases.py")],
                       cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-1000:]
