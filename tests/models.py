"""Tiny seeded models the tests compile: one per attention form tpc must handle.

Weights are drawn with a larger spread than the usual init so attention is peaked: then the
tokens each method keeps are well separated and every backend keeps the same ones.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn


def sharpen(model: nn.Module, seed: int = 0, gain: float = 1.5) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:]) if p.dim() > 2 or p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(fan_in))
            elif p.dim() == 1 and not torch.all(p == 1):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def tiny_timm_vit(seed: int = 0, **kwargs) -> nn.Module:
    """timm VisionTransformer, 32x32 images, 8x8 patches: 16 patches + [CLS] = 17 tokens."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=5)
    args.update(kwargs)
    return sharpen(timm.models.vision_transformer.VisionTransformer(**args), seed)


class ExplicitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class ExplicitBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ExplicitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandWrittenViT(nn.Module):
    """Attention written out as softmax(q·kᵀ/√d)·v, with a [CLS] and one register token."""

    def __init__(self, dim: int = 32, depth: int = 4, heads: int = 2, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList(ExplicitBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        b = x.shape[0]
        return torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), x], dim=1)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def hand_written_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sharpen(HandWrittenViT(), seed)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (post-norm) over 16 feature vectors with a [CLS] token."""

    def __init__(self, features: int = 8, dim: int = 32, depth: int = 3, heads: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.encoder(x)[:, 0])


def encoder_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sharpen(EncoderClassifier(), seed)


def image_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def feature_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 16, 8, generator=torch.Generator().manual_seed(seed)),)


# name -> (factory, inputs(batch), number of attention layers, prefix tokens)
TEST_MODELS = {
    "timm_vit": (tiny_timm_vit, image_inputs, 4, 1),
    "handwritten_vit": (hand_written_vit, image_inputs, 4, 2),
    "transformer_encoder": (encoder_classifier, feature_inputs, 3, 1),
}


def cli_tiny_vit():
    """For `tpc compile models:cli_tiny_vit` in the CLI tests."""
    return tiny_timm_vit(), image_inputs(2)
