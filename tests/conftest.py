from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(os.environ.get("TPC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
MAX_WORKERS = 8  # beyond this, starting a worker (torch import, captures) costs more than it saves


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current output")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Spread the tests over the cores this process may use (pytest-xdist), one torch thread per
    worker, unless -n is given, xdist is off (-p no:xdist) or --pdb is on."""
    if (not config.pluginmanager.hasplugin("xdist") or config.option.numprocesses is not None
            or os.environ.get("PYTEST_XDIST_WORKER")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2 or config.getoption("usepdb"):
        return
    config.option.numprocesses = min(cores, MAX_WORKERS)
    if config.option.dist == "no":
        config.option.dist = "worksteal"
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers and the `python -m tpc` they start: one thread per core


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "vit_cifar10_timm.pth").is_file() or not (SHARED / "cifar10_test.npz").is_file():
        pytest.skip(f"needs the trained CIFAR-10 ViT and test images in {SHARED} (../shared/data beside the project)")
    return SHARED
