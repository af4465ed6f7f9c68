"""The trained CIFAR-10 ViT in ../shared/data as a tpc model id: ``benchmarks.cifar_vit:model``.

A timm VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
mlp_ratio=2, global_pool="token"); its normalisation rides on ``pretrained_cfg`` so
``tpc eval`` picks it up. Set TPC_SHARED to point elsewhere than ../shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

SHARED = Path(os.environ.get("TPC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
WEIGHTS = SHARED / "vit_cifar10_timm.pth"
DATA = SHARED / "cifar10_test.npz"
CONFIG = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0,
              global_pool="token")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def model():
    net = VisionTransformer(**CONFIG)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    net.pretrained_cfg = {"mean": MEAN, "std": STD, "input_size": (3, 32, 32)}
    return net.eval(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
