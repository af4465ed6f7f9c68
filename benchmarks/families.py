"""Which architectures tpc prunes as they are: every family here is built with random weights
at a small size (the structure is what matters), compiled with ``keep=1.0`` (must reproduce
the model: max abs error printed) and then with ``keep=0.7`` at one layer. Prints a markdown
table: the family, the method used, the outcome, and for refusals tpc's own reason.

    python benchmarks/families.py            # all families (a few minutes on 2 CPU cores)
    python benchmarks/families.py eva02 cait # some of them

Methods: topk-cls where the model has a [CLS] token; topk-mass (attention received) where it
has none; random where scores do not matter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
import transformers as hf  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import tpc  # noqa: E402

IMG = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
IDS = torch.randint(5, 120, (2, 16), generator=torch.Generator().manual_seed(0))
TEXT = (IDS, torch.ones_like(IDS))
SMALL = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
HF_VIS = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
HF_TXT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)


class LastHidden(torch.nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns last_hidden_state."""

    def __init__(self, model, *names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).last_hidden_state


def _timm(name, **kw):
    return timm.create_model(name, **{**SMALL, **kw}), IMG


def _whisper():
    config = hf.WhisperConfig(d_model=32, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=8,
                              decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                              max_source_positions=16)
    return LastHidden(hf.WhisperModel(config).encoder, "input_features"), (torch.randn(2, 8, 32),)


def _llama():
    config = hf.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=1)
    return LastHidden(hf.LlamaModel(config), "input_ids"), (IDS,)


# name -> (factory, method, layer)
FAMILIES = {
    "timm DeiT-III (LayerScale)": (lambda: _timm("deit3_small_patch16_224"), "topk-cls", 1),
    "timm BEiT (relative-position bias)": (lambda: _timm("beit_base_patch16_224"), "topk-cls", 1),
    "timm ViT, average pool, no [CLS]": (lambda: _timm("vit_base_patch16_224", class_token=False, global_pool="avg"),
                                         "topk-mass", 1),
    "timm SigLIP ViT (attention-pool head)": (lambda: _timm("vit_base_patch16_siglip_224"), "topk-mass", 1),
    "timm EVA-02 (2-D rotary positions)": (lambda: _timm("eva02_tiny_patch14_224"), "topk-cls", 1),
    "timm CaiT (talking heads, class attention)": (lambda: _timm("cait_xxs24_224"), "topk-mass", 1),
    "timm CaiT, a class-attention layer": (lambda: _timm("cait_xxs24_224"), "topk-mass", 3),
    "timm LeViT, first stage": (lambda: (timm.models.levit.Levit(img_size=192, embed_dim=(32, 48, 64), key_dim=8,
                                                                 depth=(1, 1, 2), num_heads=(2, 2, 2), num_classes=5),
                                         (torch.randn(2, 3, 192, 192),)), "topk-mass", 0),
    "timm LeViT, last stage": (lambda: (timm.models.levit.Levit(img_size=192, embed_dim=(32, 48, 64), key_dim=8,
                                                                depth=(1, 1, 2), num_heads=(2, 2, 2), num_classes=5),
                                        (torch.randn(2, 3, 192, 192),)), "topk-mass", 4),
    "timm Swin": (lambda: (timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5),
                           (torch.randn(2, 3, 224, 224),)), "topk-mass", 1),
    "timm PiT": (lambda: (timm.create_model("pit_ti_224", pretrained=False, num_classes=5), (torch.randn(2, 3, 224, 224),)),
                 "topk-cls", 1),
    "timm XCiT": (lambda: _timm("xcit_nano_12_p8_224", embed_dim=32, depth=3, num_heads=2), "topk-cls", 1),
    "timm ConvNeXt": (lambda: (timm.create_model("convnext_atto", pretrained=False, num_classes=5), IMG), "topk-mass", 1),
    "HF Dinov2Model": (lambda: (hf.Dinov2Model(hf.Dinov2Config(**HF_VIS)), IMG), "topk-cls", 1),
    "HF BeitModel (relative-position bias)": (
        lambda: (hf.BeitModel(hf.BeitConfig(**HF_VIS, use_relative_position_bias=True)), IMG), "topk-cls", 1),
    "HF Data2VecVisionModel (relative-position bias)": (
        lambda: (hf.Data2VecVisionModel(hf.Data2VecVisionConfig(**HF_VIS, use_relative_position_bias=True)), IMG),
        "topk-cls", 1),
    "HF CLIPVisionModel": (lambda: (hf.CLIPVisionModel(hf.CLIPVisionConfig(**HF_VIS)), IMG), "topk-cls", 1),
    "HF SiglipVisionModel": (lambda: (hf.SiglipVisionModel(hf.SiglipVisionConfig(**HF_VIS)), IMG), "topk-mass", 1),
    "HF ViTMAEModel": (lambda: (hf.ViTMAEModel(hf.ViTMAEConfig(**HF_VIS, mask_ratio=0.0)), IMG), "topk-mass", 1),
    "HF RobertaModel": (lambda: (hf.RobertaModel(hf.RobertaConfig(**HF_TXT, pad_token_id=1)), TEXT), "topk-cls", 1),
    "HF DistilBertModel": (lambda: (hf.DistilBertModel(hf.DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=2,
                                                                           hidden_dim=64, max_position_embeddings=64)),
                                    TEXT), "topk-cls", 1),
    "HF T5EncoderModel (relative-position bias)": (
        lambda: (hf.T5EncoderModel(hf.T5Config(vocab_size=120, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2)),
                 TEXT), "topk-mass", 1),
    "HF Whisper encoder": (_whisper, "topk-mass", 1),
    "HF LlamaModel prefill (1-D rotary, causal)": (_llama, "random", 1),
}


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def try_family(name: str) -> tuple[str, str]:
    factory, method, layer = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = factory()
    model.eval()
    try:
        twin = tpc.compile(model, inputs, method=method, layers=[layer], keep=1.0)
        with torch.no_grad():
            err = max(float((a - b).abs().max()) for a, b in zip(_leaves(twin(*inputs)), _leaves(model(*inputs))))
        pm = tpc.compile(model, inputs, method=method, layers=[layer], keep=0.7)
        with torch.no_grad():
            pm(*inputs)
    except tpc.TpcError as e:
        return method, f"refused: {str(e).split(' [in pass')[0]}"
    tokens = ", ".join(str(s.tokens) for s in pm.report.sites)
    return method, f"works: keep=1.0 max abs error {err:.1e}; keep=0.7 after layer {layer}, queries per layer: {tokens}"


def main(names: list[str]) -> None:
    names = names or list(FAMILIES)
    print("| family | method | outcome |\n|---|---|---|")
    for name in names:
        method, outcome = try_family(name)
        print(f"| {name} | {method} | {outcome} |", flush=True)


if __name__ == "__main__":
    main([n for n in FAMILIES if any(a.lower() in n.lower() for a in sys.argv[1:])] if sys.argv[1:] else [])
