"""Qwen2-VL (stock ``Qwen2VLForConditionalGeneration``, SDPA): the language model captured with
the eager vision encoder's features and 3-D M-RoPE positions; visual-token pruning through
prefill and generate(), against the eager references of tests/vlm_reference.py."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from tpc.errors import TpcError
from tpc.vlm import capture_prefill, compile_vlm, prune
from vlm_reference import check_golden, divprune_loop, eager_from, expected_kept, fastv_kept, kcenter_loop, real

pytestmark = pytest.mark.slow  # Qwen2-VL's own paths: the full run; test_vlm_llava's fast cases cover tpc.vlm on every edit

IMAGE, PAD, START, END, VISUAL, SIDE = 63, 0, 61, 60, 16, 8  # an 8x8-patch image, 2x2 merged: 16 visual tokens


def tiny_qwen2vl(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                       "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 256, "pad_token_id": PAD,
                     "bos_token_id": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
        image_token_id=IMAGE, video_token_id=62, vision_start_token_id=START, vision_end_token_id=END,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD, attn_implementation=attn)
    return Qwen2VLForConditionalGeneration(config).eval()


def batch(rows, gen):
    """Left-padded processor outputs for prompts (text before, text after) around one image each."""
    prompts = [[1] + torch.randint(3, 60, (a,), generator=gen).tolist() + [START] + [IMAGE] * VISUAL + [END]
               + torch.randint(3, 60, (b,), generator=gen).tolist() for a, b in rows]
    length = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(len(rows) * SIDE * SIDE, 3 * 2 * 4 * 4, generator=gen),
            "image_grid_thw": torch.tensor([[1, SIDE, SIDE]] * len(rows)),
            "mm_token_type_ids": (ids == IMAGE).int()}


@pytest.fixture(scope="module")
def qwen():
    inputs = batch([(2, 5), (1, 2)], torch.Generator().manual_seed(1))
    model = tiny_qwen2vl()
    return model, inputs, capture_prefill(model, inputs)


def one(inputs, b):
    """Example b alone, without its padding."""
    real = inputs["attention_mask"][b].bool()
    rows = slice(b * SIDE * SIDE, (b + 1) * SIDE * SIDE)
    return {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real],
            "pixel_values": inputs["pixel_values"][rows], "image_grid_thw": inputs["image_grid_thw"][b:b + 1],
            "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, real]}


def hf_forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def mrope(model, inputs):
    """[3, B, S] positions as the stock model assigns them (its own get_rope_index)."""
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs["image_grid_thw"],
                                      attention_mask=inputs["attention_mask"])[0]


def reference(model, inputs, hidden, kept, first_layer):
    return eager_from(model.model.language_model, model.lm_head, hidden, kept, first_layer, inputs["attention_mask"],
                      mrope(model, inputs))


def test_keep_all_is_the_stock_model(qwen):
    model, inputs, program = qwen
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=1.0)
    out = pruned.prefill(**inputs)
    ref = hf_forward(model, inputs).logits
    valid = inputs["attention_mask"].bool()
    assert out.logits.shape == ref.shape
    assert torch.allclose(out.logits[valid], ref[valid], atol=1e-5)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=6), expected)
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7)
    torch.manual_seed(3)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7), sampled)
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [inputs["input_ids"].shape[1]] * 3


def test_fastv_matches_eager_reference_and_shrinks_the_cache(qwen):
    model, inputs, program = qwen
    layer, keep = 1, 4
    out = prune(model, program, inputs, method="fastv", layers=layer, keep=keep).prefill(**inputs)
    eager = tiny_qwen2vl("eager")
    eager.load_state_dict(model.state_dict())
    attention = hf_forward(eager, inputs, output_attentions=True).attentions[layer]
    kept = fastv_kept(attention, inputs["input_ids"], IMAGE, keep)
    assert torch.equal(out.kept[0], kept)
    hidden = hf_forward(model, inputs, output_hidden_states=True).hidden_states[layer + 1]
    ref = reference(model, inputs, hidden, kept, layer + 1)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    s = inputs["input_ids"].shape[1]
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [s, s, s - VISUAL + keep]


@pytest.mark.parametrize("method,select", [("divprune", divprune_loop), ("kcenter", kcenter_loop), ("random", None)])
def test_before_the_language_model_keeps_the_original_positions(qwen, method, select):
    model, inputs, program = qwen
    keep = 5
    out = prune(model, program, inputs, method=method, keep=keep).prefill(**inputs)
    embeds = hf_forward(model, inputs, output_hidden_states=True).hidden_states[0]  # image features scattered in
    kept = expected_kept(select, embeds, inputs["input_ids"], IMAGE, keep, out.kept[0])
    assert torch.equal(out.kept[0], kept)
    ref = reference(model, inputs, embeds, kept, 0)  # original 3-D positions of the kept tokens
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    assert all(out.cache.layers[i].keys.shape[2] == kept.shape[1] for i in range(3))


def test_batch_equals_each_example_alone_and_decoding_continues_from_the_unpruned_positions(qwen):
    model, inputs, program = qwen
    pruned = prune(model, program, inputs, method="kcenter", layers=[0, 1], keep=0.5)
    out = pruned.prefill(**inputs)
    s = inputs["input_ids"].shape[1]
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [s, s - 8, s - 12]
    generated = pruned.generate(**inputs, max_new_tokens=4, eos_token_id=None)  # 4 tokens each, no early stop
    for b in range(2):
        alone = one(inputs, b)
        single = pruned.prefill(**alone)
        rows = real(inputs["attention_mask"], out.kept[-1])[b]
        assert torch.allclose(out.logits[b, rows], single.logits[0], atol=1e-5)
        new = pruned.generate(**alone, max_new_tokens=4, eos_token_id=None)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(generated[b, s:], new)
    # the first generated token's position is Qwen2-VL's: the text position plus rope_deltas (max position + 1)
    from tpc.vlm.module import last_position

    positions, deltas = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    assert torch.equal(last_position(out.positions) + 1, inputs["attention_mask"].sum(1, keepdim=True) + deltas)


def test_bad_inputs_are_refused_in_one_line(qwen, tmp_path):
    model, inputs, program = qwen
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=0.5)
    for change, message in (
            ({"input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, 5)}, "no image token"),
            ({"image_grid_thw": inputs["image_grid_thw"][:1], "pixel_values": inputs["pixel_values"][:64]},
             "images make"),
            ({"image_grid_thw": None}, "image_grid_thw")):
        with pytest.raises(TpcError, match=message) as err:
            pruned.generate(**{**inputs, **change}, max_new_tokens=2)
        assert "\n" not in str(err.value)
    with pytest.raises(TpcError, match="beyond the language model's depth"):
        compile_vlm(model, inputs, method="fastv", layers=3)
    with pytest.raises(TpcError, match=r"Qwen2VisionTransformerPretrainedModel runs eagerly, outside the captured "
                                       r"graph .* so topk-cls has no vision attention to score with: use fastv") as err:
        compile_vlm(model, inputs, method="topk-cls", keep=0.5, vision_layer=[0])
    assert "\n" not in str(err.value)
    import tpc

    with pytest.raises(TpcError, match="TensorRT engines are written for encoders only"):
        tpc.export(pruned, tmp_path / "vlm.plan")
    assert list(tmp_path.iterdir()) == []


def test_api_writes_a_checked_program_with_the_eager_encoders_features_as_input(qwen, tmp_path):
    import tpc

    model, inputs, _ = qwen
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        pruned = tpc.compile(model, inputs, method="fastv", layers=1, keep=0.5)
    finally:
        hook.remove()
    assert len(calls) == 1  # the eager vision encoder runs once per compile, whatever capture and rewrite need
    assert "run eagerly" in pruned.report.table() and pruned.report.layer_tokens == [26, 26, 18]
    result = tpc.export(pruned, tmp_path / "vlm.pt2")
    assert result.batches == (1, 2) and result.max_abs_error == 0.0
    written = torch.export.load(tmp_path / "vlm.pt2").module()
    ids, features, mask, positions = pruned.example_inputs  # the language model's inputs
    assert features.shape == (2, VISUAL, 32) and positions.shape == (3, 2, 26)
    assert written(ids, features, mask, positions)[-1].shape == (2, 26 - 8)
    result = tpc.export(pruned, tmp_path / "vlm.onnx")  # the same inputs; ONNX Runtime checked against the graph
    assert result.batches == (1, 2) and result.max_abs_error < 1e-5
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "vlm.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "image_features", "attention_mask", "position_ids"]
    assert pruned.report.visual_span == (4, 19) and tpc.inspect(model, inputs).visual_span == (4, 19)  # unpruned


def test_golden_graph(qwen, update_golden):
    model, inputs, program = qwen
    check_golden(prune(model, program, inputs, method="fastv", layers=1, keep=4).gm, "vlm_qwen2vl_fastv", update_golden)
