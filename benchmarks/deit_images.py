"""Images at DeiT's input size for `tpc tune` latency runs on random-weight DeiT-S (docs/tune.md):
the first N CIFAR-10 test images of ../shared/data, upsampled to 224x224 (bilinear), uint8 NCHW.

    python benchmarks/deit_images.py 64 deit_images.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar_vit import DATA  # noqa: E402


def main(count: int, path: str) -> None:
    images = torch.from_numpy(np.load(DATA)["images"][:count]).permute(0, 3, 1, 2).float()
    big = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    np.savez(path, images=big.round().clamp(0, 255).to(torch.uint8).numpy())
    print(f"wrote {path}: {count} images, 3x224x224")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
