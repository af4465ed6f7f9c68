"""Architectures beyond the plain ViT/BERT families, each on a tiny seeded config: rotary
positions (timm EVA-02, a Llama-style decoder), Hugging Face Data2VecVision and T5 encoders,
talking-heads attention (CaiT) and LeViT. keep=1.0 reproduces the model exactly; keep < 1
matches an eager forward that prunes the same way, or is refused for the true reason."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import tpc
from tpc.capture import capture
from tpc.graph import find_attention_sites
from tpc.passes import InsertPrune, PassManager
from tpc.passes.compaction import is_rewritten
from models import sharpen
from reference import eager_cait, eager_data2vec, eager_eva, eager_levit, eager_llama, eager_t5_encoder

pytestmark = pytest.mark.slow  # real architectures' position schemes: the full run; test_token_axis_rules covers the rules on every edit


def _images(batch, seed, size=32):
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def _exact(pm, model, inputs):
    with torch.no_grad():
        got, want = pm(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def eva02():
    torch.manual_seed(0)
    return sharpen(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                     depth=3, num_heads=2, num_classes=5))


class LlamaHidden(torch.nn.Module):
    """A decoder language model's prefill: ids -> last hidden states (no cache)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=64)
        self.model = sharpen(LlamaModel(config))

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).last_hidden_state


def _ids(batch, seed, length=16):
    return (torch.randint(5, 120, (batch, length), generator=torch.Generator().manual_seed(seed)),)


def test_eva02_2d_rotary_table_is_gathered_with_the_kept_patches():
    model = eva02()
    x = _images(3, seed=4)
    _exact(tpc.compile(model, _images(2, 1), method="random", layers=[1], keep=1.0), model, x)
    pm = tpc.compile(model, _images(2, 1), method="random", layers=[1], keep=0.5)
    assert [s.tokens for s in pm.report.sites] == [17, 17, 9]
    torch.testing.assert_close(pm(*x), eager_eva(model, *x, layer=1, keep=0.5), atol=1e-5, rtol=1e-5)


def test_llama_1d_rotary_positions_and_causal_mask_follow_the_kept_tokens():
    model = LlamaHidden().eval()
    ids = _ids(3, seed=4)
    _exact(tpc.compile(model, _ids(2, 1), method="random", layers=[1], keep=1.0), model, ids)
    pm = tpc.compile(model, _ids(2, 1), method="random", layers=[1], keep=0.5)
    assert [s.tokens for s in pm.report.sites] == [16, 16, 8]
    torch.testing.assert_close(pm(*ids), eager_llama(model.model, *ids, layer=1, keep=0.5), atol=1e-5, rtol=1e-5)


def data2vec_vision():
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    torch.manual_seed(0)
    config = Data2VecVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, use_relative_position_bias=True)
    return sharpen(Data2VecVisionModel(config, add_pooling_layer=True))


def test_data2vec_vision_relative_position_bias_is_gathered_on_both_token_axes():
    """The crash was in refresh_meta: with autograd on, the bias (made from a parameter) required
    grad, CPU SDPA's fake kernel then gave other output strides and export's view failed."""
    model = data2vec_vision()
    x = _images(3, seed=4)
    twin = tpc.compile(model, _images(2, 1), method="random", layers=[1], keep=1.0)
    with torch.no_grad():
        for got, want in zip(twin(*x).values(), model(*x).values()):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pm = tpc.compile(model, _images(2, 1), method="random", layers=[1], keep=0.5)
    assert [s.tokens for s in pm.report.sites] == [17, 17, 9]
    got = pm(*x)
    for g, want in zip((got["last_hidden_state"], got["pooler_output"]), eager_data2vec(model, *x, layer=1, keep=0.5)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def t5_encoder():
    """Random weights: no T5 with weights installs from a package (MiniLM is the real-weights text check)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=120, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2)
    return sharpen(T5EncoderModel(config))


def test_t5_encoder_asserts_pass_the_token_axis_and_its_shared_position_bias_is_gathered():
    from families import text_inputs

    model = t5_encoder()
    ids, mask = text_inputs(3, seed=6)
    twin = tpc.compile(model, text_inputs(2), method="random", layers=[1], keep=1.0)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids, mask)["last_hidden_state"], model(ids, mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    pm = tpc.compile(model, text_inputs(2), method="random", layers=[1], keep=8)
    assert any(n.target == torch.ops.aten._assert_tensor_metadata.default and not is_rewritten(n)
               for n in pm.graph_module.graph.nodes)
    torch.testing.assert_close(pm(ids, mask)["last_hidden_state"], eager_t5_encoder(model, ids, mask, layer=1, keep=8),
                               atol=1e-5, rtol=1e-5)


def cait():
    torch.manual_seed(0)
    return sharpen(timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3,
                                     num_heads=2, num_classes=5))


def test_cait_talking_heads_layers_are_found_numbered_and_pruned():
    model = cait()
    x = _images(3, seed=4)
    pm = tpc.compile(model, _images(2, 1), method="random", layers=[1], keep=0.5)
    assert [(s.module, s.tokens) for s in pm.report.sites] == [
        ("blocks.0.attn", 16), ("blocks.1.attn", 16), ("blocks.2.attn", 8),
        ("blocks_token_only.0.attn", 1), ("blocks_token_only.1.attn", 1)]
    torch.testing.assert_close(pm(*x), eager_cait(model, *x, layer=1, keep=0.5), atol=1e-5, rtol=1e-5)
    twin = tpc.compile(model, _images(2, 1), method="topk-mass", layers=[0, 1], keep=1.0)
    _exact(twin, model, x)
    # the scorer reading layer 0's softmax must not hide that layer from the site numbering
    assert [s.module for s in twin.report.sites] == [s.module for s in pm.report.sites]
    with pytest.raises(tpc.TpcError, match=r"layer 3 \(blocks_token_only.0.attn\) is class- or cross-attention "
                                           r"\(1 query over 17 keys\).*self-attention layers are 0-2"):
        tpc.compile(model, _images(2, 1), method="random", layers=[3], keep=0.5)


def levit():
    torch.manual_seed(0)
    model = timm.models.levit.Levit(img_size=192, num_classes=5, embed_dim=(32, 48, 64), key_dim=8, depth=(1, 1, 2),
                                    num_heads=(2, 2, 2))
    return sharpen(model)


def test_levit_batch_norm_carries_tokens_and_only_the_last_stage_prunes():
    """Sites: 0 stage 0 | 1 downsample | 2 stage 1 | 3 downsample | 4, 5 stage 2. The downsampling
    attention reshapes the tokens back to their grid, which pruning no longer has. LeViT's export
    is slow, so it is captured once and the pass pipeline runs on copies."""
    model = levit()
    x = _images(3, seed=4, size=192)
    gm = capture(model, _images(2, 1, size=192))

    def prune(layer, keep):
        pruned = copy.deepcopy(gm)
        PassManager([InsertPrune("random", layer, keep, prefix=0)])(pruned)
        return pruned

    pruned = prune(4, 0.5)
    assert [s.tokens for s in find_attention_sites(pruned)] == [144, 36, 36, 9, 9, 5]
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), eager_levit(model, *x, stage=2, block=0, layer=4, keep=0.5), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(prune(4, 1.0)(*x), model(*x), atol=1e-5, rtol=1e-5)
    with pytest.raises(tpc.TpcError, match=r"stages.2.downsample.*a reshape back to a grid.*Prune after layers 4-5 only"):
        prune(2, 0.5)
