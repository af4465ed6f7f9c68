"""Tiny seeded models of the families users bring: timm variants, Hugging Face, torchvision."""

from __future__ import annotations

import timm
import torch
from torch import nn

from models import image_inputs, sharpen


def _timm(name, **kwargs):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    args.update(kwargs)
    return sharpen(timm.create_model(name, **args))


def deit_distilled():
    return _timm("deit_tiny_distilled_patch16_224")


def dinov2_registers():
    return _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, init_values=0.5)


def clip_style():
    return _timm("vit_base_patch16_clip_224", pre_norm=True, global_pool="avg", fc_norm=True)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=5)
    return sharpen(ViTForImageClassification(config))


def hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    config = DeiTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                        patch_size=8, num_labels=5)
    return sharpen(DeiTForImageClassification(config))


def hf_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    return sharpen(BertModel(config))


def text_inputs(batch=2, seed=1, length=16, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if padded:
        for b in range(batch):
            real = int(torch.randint(length // 2, length + 1, (1,), generator=g))
            mask[b, real:] = 0
            ids[b, real:] = 0
    return ids, mask


class MeanPooledEncoder(nn.Module):
    """A sentence encoder: mask-aware mean of the last hidden states (sentence-transformers' pooling)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids, mask):
        hidden = self.encoder(ids, mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def torchvision_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return sharpen(VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                                     num_classes=5))


# name -> (factory, inputs(batch, seed), prefix tokens)
FAMILIES = {
    "timm_deit_distilled": (deit_distilled, image_inputs, 2),
    "timm_dinov2_registers": (dinov2_registers, lambda b=2, seed=1: (torch.randn(b, 3, 28, 28, generator=torch.Generator().manual_seed(seed)),), 5),
    "timm_clip_style": (clip_style, image_inputs, 1),
    "hf_vit": (hf_vit, image_inputs, 1),
    "hf_deit": (hf_deit, image_inputs, 2),
    "hf_bert": (hf_bert, text_inputs, 1),
    "torchvision_vit": (torchvision_vit, image_inputs, 1),
}
