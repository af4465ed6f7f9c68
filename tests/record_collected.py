"""A pytest plugin for the tests that run pytest (``-p record_collected``): every collected test's id,
before ``-k`` deselects any, written to the file ``TPC_COLLECTED`` names, so one run both says what a
set of files collects and runs a few of those tests."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    path = os.environ.get("TPC_COLLECTED")
    if path:
        with open(path, "w") as f:
            f.write("\n".join(item.nodeid for item in items))
