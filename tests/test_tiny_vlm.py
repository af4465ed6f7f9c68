"""The trained tiny LLaVA of benchmarks/train_tiny_vlm.py (docs/vlm.md, "Accuracy"): its vision tower
is the shared CIFAR ViT converted from timm, and its prompts hold one placeholder per visual token."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import train_tiny_vlm as tiny  # noqa: E402
from benchmarks.cifar_vit import DATA, WEIGHTS  # noqa: E402

pytestmark = pytest.mark.slow  # the trained CIFAR ViT as a VLM tower: the full run

SHARED = WEIGHTS.exists() and DATA.exists()
needs_shared = pytest.mark.skipif(not SHARED, reason=f"the shared CIFAR ViT and images are not at {WEIGHTS.parent}")


@pytest.fixture(scope="module")
def model():
    return tiny.build(seed=0, text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


@needs_shared
def test_the_converted_tower_is_the_timm_vit(model):
    """Every block's output and the final norm of the HF ViTModel tower equal timm's on real images."""
    from benchmarks.cifar_vit import model as timm_vit

    net, _ = timm_vit()
    images, labels = tiny.load_data(range(0, 32))
    x = tiny.pixels(images)
    with torch.no_grad():
        out = model.model.vision_tower(x, output_hidden_states=True)
        hidden = net._pos_embed(net.patch_embed(x))
        expected = [hidden]
        for block in net.blocks:
            hidden = block(hidden)
            expected.append(hidden)
        assert len(out.hidden_states) == len(expected) == 5
        for got, want in zip(out.hidden_states, expected):
            assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(out.last_hidden_state, net.forward_features(x), atol=1e-5)
        assert (net.forward_head(out.last_hidden_state).argmax(-1).numpy() == labels).mean() > 0.5  # a trained ViT


@needs_shared
def test_prompts_hold_one_placeholder_per_visual_token(model):
    """The processor-like helper puts exactly as many <image> tokens in each prompt as the tower
    makes visual tokens (LLaVA's features, [CLS] dropped), and tpc reads the same count."""
    from tpc.vlm.family import spec_of

    tok = tiny.tokenizer()
    images, labels = tiny.load_data(range(0, 2))
    inputs_question = tiny.is_there(tiny.CLASSES[int(labels[0])])
    inputs = tiny.processor(tok, images, [tiny.WHAT, inputs_question])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    visual = sum(f.shape[0] for f in features) // 2 if isinstance(features, (list, tuple)) else features.shape[1]
    assert visual == tiny.VISUAL == spec_of(model).tokens_per_image == 64
    assert ((inputs["input_ids"] == tiny.IMAGE).sum(1) == visual).all()
    for row, mask, question in zip(inputs["input_ids"], inputs["attention_mask"], [tiny.WHAT, inputs_question]):
        words = tok.convert_ids_to_tokens(row[mask.bool()].tolist())  # left padding dropped
        assert words == ["<bos>"] + ["<image>"] * visual + question.split()
    assert tok.unk_token_id not in inputs["input_ids"]
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, inputs["input_ids"].shape[1], len(tok))


@needs_shared
@pytest.mark.skipif(not (tiny.CACHE / "config.json").exists(), reason=f"no trained tiny LLaVA at {tiny.CACHE}")
def test_the_trained_model_answers_from_the_image():
    """The saved weights with the word-level tokenizer: well above chance (10 % for the class,
    50 % for yes/no) on held-out images, and a wrong image (the batch rolled by one) loses it."""
    model, tok = tiny.load(tiny.CACHE)
    images, labels = tiny.load_data(range(9900, 9964))
    questions, answers = tiny.eval_questions(labels)
    expected = torch.tensor(tok.convert_tokens_to_ids(answers[:64]))
    with torch.no_grad():
        right = model(**tiny.processor(tok, images, questions[:64])).logits[:, -1].argmax(-1) == expected
        rolled = model(**tiny.processor(tok, images[[*range(1, 64), 0]], questions[:64])).logits[:, -1].argmax(-1)
    assert right.float().mean() > 0.4 and (rolled == expected).float().mean() < 0.3
