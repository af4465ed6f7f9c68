from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(os.environ.get("TPC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current output")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "vit_cifar10_timm.pth").is_file() or not (SHARED / "cifar10_test.npz").is_file():
        pytest.skip(f"needs the trained CIFAR-10 ViT and test images in {SHARED} (../shared/data beside the project)")
    return SHARED
