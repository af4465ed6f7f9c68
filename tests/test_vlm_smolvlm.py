"""SmolVLM (stock ``SmolVLMForConditionalGeneration``, Idefics3 family, SDPA): a SigLIP-like tower
without [CLS], the pixel-shuffle connector and a Llama decoder in one captured prefill;
visual-token pruning through prefill and generate(), against the eager references of
tests/vlm_reference.py."""

from __future__ import annotations

import pytest
import torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

from tpc.errors import TpcError
from tpc.vlm import capture_prefill, compile_vlm, prune
from tpc.vlm.inputs import prompt_positions
from vlm_reference import (check_golden, divprune_loop, eager_from, expected_kept, fastv_kept, kcenter_loop,
                           real)

pytestmark = pytest.mark.slow  # SmolVLM's own paths: the full run; test_vlm_llava's fast cases cover tpc.vlm on every edit

IMAGE, PAD, VISUAL = 63, 0, 16  # a 32x32 image, 4x4 patches, pixel shuffle 2: 16 visual tokens


def tiny_smolvlm(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 4},
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
                     "max_position_embeddings": 256, "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2},
        image_token_id=IMAGE, scale_factor=2, attn_implementation=attn)
    return SmolVLMForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def smol():
    gen = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 60, (a,), generator=gen).tolist() + [IMAGE] * VISUAL
               + torch.randint(3, 60, (b,), generator=gen).tolist() for a, b in ((2, 5), (1, 3))]
    length = max(map(len, prompts))
    inputs = {"input_ids": torch.tensor([[PAD] * (length - len(p)) + p for p in prompts]),
              "attention_mask": torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts]),
              "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=gen)}
    model = tiny_smolvlm()
    return model, inputs, capture_prefill(model, inputs)


def hf_forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, position_ids=prompt_positions(inputs["attention_mask"]), **kw)


def reference(model, inputs, hidden, kept, first_layer):
    mask = inputs["attention_mask"]
    return eager_from(model.model.text_model, model.lm_head, hidden, kept, first_layer, mask, prompt_positions(mask))


def test_keep_all_is_the_stock_model(smol):
    model, inputs, program = smol
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=1.0)
    out = pruned.prefill(**inputs)
    ref = hf_forward(model, inputs).logits
    valid = inputs["attention_mask"].bool()
    assert out.logits.shape == ref.shape and torch.allclose(out.logits[valid], ref[valid], atol=1e-5)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=6), expected)
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7)
    torch.manual_seed(3)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7), sampled)


def test_fastv_matches_eager_reference_and_shrinks_the_cache(smol):
    model, inputs, program = smol
    layer, keep = 1, 4
    out = prune(model, program, inputs, method="fastv", layers=layer, keep=keep).prefill(**inputs)
    eager = tiny_smolvlm("eager")
    eager.load_state_dict(model.state_dict())
    kept = fastv_kept(hf_forward(eager, inputs, output_attentions=True).attentions[layer], inputs["input_ids"],
                      IMAGE, keep)
    assert torch.equal(out.kept[0], kept)
    hidden = hf_forward(model, inputs, output_hidden_states=True).hidden_states[layer + 1]
    ref = reference(model, inputs, hidden, kept, layer + 1)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    s = inputs["input_ids"].shape[1]
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [s, s, s - VISUAL + keep]


@pytest.mark.parametrize("method,select", [("divprune", divprune_loop), ("kcenter", kcenter_loop), ("random", None)])
def test_diversity_before_the_language_model(smol, method, select):
    model, inputs, program = smol
    keep = 5
    out = prune(model, program, inputs, method=method, keep=keep).prefill(**inputs)
    embeds = hf_forward(model, inputs, output_hidden_states=True).hidden_states[0]  # image features scattered in
    kept = expected_kept(select, embeds, inputs["input_ids"], IMAGE, keep, out.kept[0])
    assert torch.equal(out.kept[0], kept)
    ref = reference(model, inputs, embeds, kept, 0)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    assert all(out.cache.layers[i].keys.shape[2] == kept.shape[1] for i in range(3))


def test_schedule_batch_equals_each_example_alone(smol):
    model, inputs, program = smol
    pruned = prune(model, program, inputs, method="random", layers=[0, 1], keep=0.5)
    out = pruned.prefill(**inputs)
    s = inputs["input_ids"].shape[1]
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [s, s - 8, s - 12]
    generated = pruned.generate(**inputs, max_new_tokens=4, eos_token_id=None)
    for b in range(2):
        real_tokens = inputs["attention_mask"][b].bool()
        alone = {"input_ids": inputs["input_ids"][b:b + 1, real_tokens],
                 "attention_mask": inputs["attention_mask"][b:b + 1, real_tokens],
                 "pixel_values": inputs["pixel_values"][b:b + 1]}
        single = pruned.prefill(**alone)
        assert torch.allclose(out.logits[b, real(inputs["attention_mask"], out.kept[-1])[b]], single.logits[0],
                              atol=1e-5)
        new = pruned.generate(**alone, max_new_tokens=4, eos_token_id=None)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(generated[b, s:], new)


def test_bad_inputs_are_refused_in_one_line(smol):
    model, inputs, program = smol
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=0.5)
    ids = inputs["input_ids"]
    for change, message in (({"input_ids": ids.masked_fill(ids == IMAGE, 5)}, "no image token"),
                            ({"pixel_values": torch.cat([inputs["pixel_values"]] * 2, 1)}, "images make"),
                            ({"pixel_values": inputs["pixel_values"][..., :16]}, "32x32"),
                            ({"pixel_values": torch.cat([inputs["pixel_values"][:1], torch.zeros(1, 1, 3, 32, 32)])},
                             "padding image"),
                            ({"pixel_attention_mask": torch.zeros(2, 1, 32, 32, dtype=torch.bool)}, "padded pixels")):
        with pytest.raises(TpcError, match=message) as err:
            pruned.generate(**{**inputs, **change}, max_new_tokens=2)
        assert "\n" not in str(err.value)
    with pytest.raises(TpcError, match="beyond the language model's depth"):
        compile_vlm(model, inputs, method="fastv", layers=3)
    with pytest.raises(TpcError, match=r"vision_layer 2: choose a vision layer from 0 to 1") as err:  # topk-cls:
        compile_vlm(model, inputs, method="topk-cls", keep=0.5, vision_layer=2)  # tests/test_vlm_vtc.py
    assert "\n" not in str(err.value)


def test_golden_graph(smol, update_golden):
    model, inputs, program = smol
    check_golden(prune(model, program, inputs, method="divprune", keep=4).gm, "vlm_smolvlm_divprune", update_golden)


def test_onnx_prefill_is_written_after_onnx_runtime_matches_the_graph(smol, tmp_path):
    """tpc.export(pruned, "vlm.onnx") on SmolVLM (vision model, pixel-shuffle connector, text model
    in the file), pruned by the attention its patches receive at two vision layers (topk-cls on a tower
    without [CLS]): ONNX Runtime checked against the graph at batch 1 and the left-padded batch 2."""
    import tpc

    model, inputs, program = smol
    pruned = prune(model, program, inputs, method="topk-cls", keep=4, vision_layer=[0, 1])  # attention received
    result = tpc.export(pruned, tmp_path / "vlm.onnx")
    assert result.batches == (1, 2) and result.max_abs_error < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm.onnx"]
