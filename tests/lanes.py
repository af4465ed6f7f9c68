"""The fast lane (`pytest -m "not slow"`, for every edit) against the full run (the README's test
command): a parametrized test runs its first case in both and the rest in the full run only."""

from __future__ import annotations

import pytest


def first_fast(values) -> list:
    """``values`` as parametrize cases (a tuple: one case of several arguments), all but the first marked slow."""
    values = [v if isinstance(v, tuple) else (v,) for v in values]
    return [pytest.param(*values[0]), *(pytest.param(*v, marks=pytest.mark.slow) for v in values[1:])]

