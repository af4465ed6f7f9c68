"""LLaVA (stock ``LlavaForConditionalGeneration``, SDPA): visual-token pruning through prefill
and generate(), against the eager references of tests/vlm_reference.py (written from the papers)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from specs import VISUAL_BEFORE, VISUAL_INSIDE
from tpc.errors import TpcError
from tpc.vlm import capture_prefill, compile_vlm, prune
from tpc.vlm.inputs import prompt_positions
from vlm_reference import (check_golden, divprune_loop, eager_from, expected_kept, fastv_kept, kcenter_loop, real,
                           visual_positions, with_text)

IMAGE, PAD, VISUAL = 63, 0, 16


def tiny_llava(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=VISUAL,
                         vision_feature_layer=-1, attn_implementation=attn)
    return LlavaForConditionalGeneration(config).eval()


def prompt(before: int, after: int, length: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Left-padded token ids: 1 (bos), text, VISUAL image tokens, text."""
    ids = [1] + torch.randint(3, 60, (before,), generator=gen).tolist() + [IMAGE] * VISUAL
    ids += torch.randint(3, 60, (after,), generator=gen).tolist()
    pad = length - len(ids)
    return [PAD] * pad + ids, [0] * pad + [1] * len(ids)


@pytest.fixture(scope="module")
def llava():
    gen = torch.Generator().manual_seed(1)
    rows = [prompt(2, 5, 24, gen), prompt(1, 3, 24, gen)]
    inputs = {"input_ids": torch.tensor([r[0] for r in rows]), "attention_mask": torch.tensor([r[1] for r in rows]),
              "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    model = tiny_llava()
    return model, inputs, capture_prefill(model, inputs)


def hf_forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, position_ids=prompt_positions(inputs["attention_mask"]), **kw)


def reference(model, inputs, hidden, kept, first_layer):
    lm = model.model.language_model
    mask = inputs["attention_mask"]
    return eager_from(lm, model.lm_head, hidden, kept, first_layer, mask, prompt_positions(mask))


@pytest.mark.slow
def test_keep_all_is_the_stock_model(llava):
    model, inputs, program = llava
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


def test_fastv_matches_eager_reference_and_shrinks_the_cache(llava):
    model, inputs, program = llava
    layer, keep = 1, 4
    pruned = prune(model, program, inputs, method="fastv", layers=layer, keep=keep)
    out = pruned.prefill(**inputs)
    eager = tiny_llava("eager")
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


@pytest.mark.slow
@pytest.mark.parametrize("method,select", [("divprune", divprune_loop), ("kcenter", kcenter_loop), ("random", None)])
def test_diversity_before_the_language_model(llava, method, select):
    model, inputs, program = llava
    keep = 5
    out = prune(model, program, inputs, method=method, keep=keep).prefill(**inputs)
    embeds = hf_forward(model, inputs, output_hidden_states=True).hidden_states[0]  # image features scattered in
    kept = expected_kept(select, embeds, inputs["input_ids"], IMAGE, keep, out.kept[0])
    assert torch.equal(out.kept[0], kept)
    ref = reference(model, inputs, embeds, kept, 0)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    assert all(out.cache.layers[i].keys.shape[2] == kept.shape[1] for i in range(3))


def _keeps_text_and_visual(kept: torch.Tensor, ids: torch.Tensor, keep: int) -> None:
    for row, example in zip(kept, ids):
        visual = example == IMAGE
        assert row.unique().numel() == row.numel() and torch.equal(row, row.sort().values)
        assert int(visual[row].sum()) == keep and int((~visual[row]).sum()) == int((~visual).sum())


@pytest.mark.parametrize("method", VISUAL_BEFORE)
def test_every_method_before_the_language_model_runs_it_on_the_tokens_it_keeps(llava, method):
    """Each method the registry says prunes visual tokens before the language model: every text
    token and ``keep`` visual tokens per example stay, and the logits are the eager language
    model's on exactly those positions, whatever the method chose."""
    model, inputs, program = llava
    keep = 5
    out = prune(model, program, inputs, method=method, keep=keep).prefill(**inputs)
    kept = out.kept[0]
    _keeps_text_and_visual(kept, inputs["input_ids"], keep)
    embeds = hf_forward(model, inputs, output_hidden_states=True).hidden_states[0]
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], reference(model, inputs, embeds, kept, 0)[rows], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", VISUAL_INSIDE)
def test_every_method_inside_the_language_model_runs_it_on_the_tokens_it_keeps(llava, method):
    """The same after decoder layer 1, for each method the registry says prunes there; the
    layers after the cut cache only the kept positions."""
    model, inputs, program = llava
    layer, keep = 1, 4
    out = prune(model, program, inputs, method=method, layers=layer, keep=keep).prefill(**inputs)
    kept = out.kept[0]
    _keeps_text_and_visual(kept, inputs["input_ids"], keep)
    hidden = hf_forward(model, inputs, output_hidden_states=True).hidden_states[layer + 1]
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], reference(model, inputs, hidden, kept, layer + 1)[rows], atol=1e-5)
    assert out.cache.layers[layer + 1].keys.shape[2] == kept.shape[1]


@pytest.mark.slow
def test_each_stage_leaves_a_compaction_record(llava):
    """The VLM pass records what it did as the encoder pass does (tpc/record.py), not in gm.meta: per stage
    the layer, the visual tokens chosen among and kept, the mask it chose among, each example's visual
    positions, and the composed kept positions, which are graph outputs."""
    from tpc.graph.nodes import val
    from tpc.record import Role, compactions, role_of

    model, inputs, program = llava
    gm = prune(model, program, inputs, method="fastv", layers="0,1", keep="0.5,0.5").gm
    records = compactions(gm)
    assert [(r.layer, r.method, r.tokens_in, r.tokens_out) for r in records] == [(0, "fastv", 16, 8), (1, "fastv", 8, 4)]
    assert [val(r.spans).shape[1] for r in records] == [16, 8]
    assert all(val(r.prunable).dtype == torch.bool and role_of(r.out) is Role.GATHER for r in records)
    outputs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    assert all(r.index in outputs for r in records) and "tpc_vlm" not in gm.meta


@pytest.mark.slow
def test_pyramid_schedule_composes_stages_and_batch_equals_alone(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="random", layers=[0, 1], keep=0.5)
    out = pruned.prefill(**inputs)
    first, second = out.kept
    assert first.shape[1] == 24 - 8 and second.shape[1] == 24 - 12
    assert all(set(second[b].tolist()) <= set(first[b].tolist()) for b in range(2))
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [24, 16, 12]
    generated = pruned.generate(**inputs, max_new_tokens=5)
    for b in range(2):
        real_tokens = inputs["attention_mask"][b].bool()
        alone = {"input_ids": inputs["input_ids"][b:b + 1, real_tokens],
                 "attention_mask": inputs["attention_mask"][b:b + 1, real_tokens],
                 "pixel_values": inputs["pixel_values"][b:b + 1]}
        single = pruned.prefill(**alone)
        rows = real(inputs["attention_mask"], out.kept[-1])[b]
        assert torch.allclose(out.logits[b, rows], single.logits[0], atol=1e-5)
        assert torch.equal(generated[b, 24:], pruned.generate(**alone, max_new_tokens=5)[0, alone["input_ids"].shape[1]:])



@pytest.mark.slow
def test_a_prompt_of_the_image_tokens_and_nothing_more_generates_as_the_stock_model(llava):
    """Any prompt length the stock model takes: the BOS and the image tokens, or the image tokens alone."""
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=1.0)
    for ids in ([1] + [IMAGE] * VISUAL, [IMAGE] * VISUAL):
        short = {"input_ids": torch.tensor([ids]), "pixel_values": inputs["pixel_values"][:1]}
        with torch.no_grad():
            assert torch.equal(pruned.generate(**short, max_new_tokens=3), model.generate(**short, max_new_tokens=3))
    dropped = prune(model, program, inputs, method="fastv", layers="0,1", keep="0.5,0")
    assert dropped.generate(input_ids=torch.tensor([[1, 5] + [IMAGE] * VISUAL]), pixel_values=short["pixel_values"],
                            max_new_tokens=2).shape == (1, VISUAL + 4)
    with pytest.raises(TpcError, match="keep 0 drops every visual token after decoder layer 1, leaving the text "
                                       "alone: a prompt needs 2 tokens besides its 16 image tokens .* got 1"):
        dropped.generate(input_ids=torch.tensor([[1] + [IMAGE] * VISUAL]), pixel_values=short["pixel_values"])


def test_a_vlm_artifact_suffix_is_refused_with_its_own_reason(llava, tmp_path, capsys):
    import tpc
    from tpc.cli import main

    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=0.5)
    with pytest.raises(TpcError, match=r"unknown artifact type '\.txt' .*written as \.pt2 or \.onnx"):
        tpc.export(pruned, tmp_path / "x.txt")
    model.save_pretrained(tmp_path / "llava")
    assert main(["compile", str(tmp_path / "llava"), "--pass", "fastv", "--layers", "0", "-o",
                 str(tmp_path / "l.plan")]) == 1
    assert "is a vision-language model: TensorRT engines are written for encoders only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]


@pytest.mark.slow
def test_generate_without_a_mask_infers_it_from_the_pad_token_as_hf(llava):
    """A left-padded batch and no attention_mask: generate() masks the pad tokens, as model.generate() does."""
    model, inputs, program = llava
    assert model.generation_config.pad_token_id == PAD and bool((inputs["input_ids"] == PAD).any())
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=1.0)
    unmasked = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        expected = model.generate(**unmasked, max_new_tokens=4)
    assert torch.equal(pruned.generate(**unmasked, max_new_tokens=4), expected)
    assert torch.equal(expected, model.generate(**inputs, max_new_tokens=4))


@pytest.mark.parametrize("change,message", [
    (lambda x: {**x, "input_ids": x["input_ids"][:0], "attention_mask": x["attention_mask"][:0],
                "pixel_values": x["pixel_values"][:0]}, r"input_ids of shape \(0, 24\) hold no prompt"),
    (lambda x: {**x, "input_ids": x["input_ids"][0]}, r"input_ids must be \[batch, tokens\], got \(24,\)"),
    (lambda x: {**x, "input_ids": x["input_ids"].float()}, "input_ids are torch.float32: token ids are integers"),
    (lambda x: {**x, "attention_mask": x["attention_mask"][:, 1:]}, r"attention_mask \(2, 23\) does not match"),
    (lambda x: {**x, "attention_mask": x["attention_mask"] * 7}, "values other than 0 and 1"),
    (lambda x: {**x, "attention_mask": torch.zeros_like(x["attention_mask"])}, "example 0 of the batch is all padding"),
    (lambda x: {**x, "max_new_tokens": 0}, "generate\\(\\): `max_new_tokens` must be greater than 0"),
    (lambda x: {**x, "do_sample": True, "temperature": 0.0}, "generate\\(\\): `temperature` \\(=0.0\\) has to be a "
                                                             "strictly positive float"),  # was transformers' ValueError
])
@pytest.mark.slow
def test_generate_refuses_bad_prompts_in_one_line(llava, change, message):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=0.5)
    with pytest.raises(TpcError, match=message) as err:
        pruned.generate(**{"max_new_tokens": 2, **change(inputs)})
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_generate_takes_a_bool_or_float_mask_as_hf(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=0.5)
    want = pruned.generate(**inputs, max_new_tokens=3)
    for dtype in (torch.bool, torch.float32):
        got = pruned.generate(**{**inputs, "attention_mask": inputs["attention_mask"].to(dtype)}, max_new_tokens=3)
        assert torch.equal(got, want)


@pytest.mark.slow
def test_inspect_of_a_pruned_vlm_program_says_it_is_pruned(llava, tmp_path, capsys):
    import tpc
    from tpc.cli import main

    model, inputs, program = llava
    tpc.export(prune(model, program, inputs, method="fastv", layers=0, keep=0.5), tmp_path / "vlm.pt2", check=False)
    assert main(["inspect", str(tmp_path / "vlm.pt2")]) == 0  # tpc.inspect's report, printed
    assert "note: vlm.pt2 was already pruned by tpc: the table shows the pruned program's" in capsys.readouterr().out


@pytest.mark.slow
def test_keeps_travel_with_their_layers_given_out_of_order(llava):
    """`--layers 1,0 --keep 0.25,0.5`: layer 0 keeps half of the 16 visual tokens, layer 1 a quarter of those."""
    model, inputs, program = llava
    out = prune(model, program, inputs, method="random", layers=[1, 0], keep=[0.25, 0.5]).prefill(**inputs)
    assert [k.shape[1] for k in out.kept] == [24 - 8, 24 - 14]
    out = prune(model, program, inputs, method="random", layers="1,0", keep="0,0.5").prefill(**inputs)
    assert [k.shape[1] for k in out.kept] == [24 - 8, 24 - 16]  # ToDRE's keep 0 stays with layer 1


@pytest.mark.slow
@pytest.mark.parametrize("vision_layer,via", [(None, "prune"), (0, "prune"), (0, "tpc.compile")])
def test_vtc_cls_scores_with_the_vision_towers_cls_attention(llava, vision_layer, via):
    """VTC-CLS (Wang et al., 2024): the [CLS] query's head-mean attention over the patches at a
    vision layer (default: the feature layer, here the last), top-k visual tokens, before the LM;
    ``vision_layer`` chosen through tpc.vlm's prune or through tpc.compile."""
    import tpc

    model, inputs, program = llava
    keep = 6
    if via == "prune":
        pruned = prune(model, program, inputs, method="topk-cls", keep=keep, vision_layer=vision_layer)
    else:
        pruned = tpc.compile(model, inputs, method="topk-cls", keep=keep, vision_layer=vision_layer)
    assert f"([CLS] attention of vision layer {1 if vision_layer is None else vision_layer})" in pruned.report.table()
    out = pruned.prefill(**inputs)
    eager = tiny_llava("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attention = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    scores = attention[1 if vision_layer is None else vision_layer][:, :, 0, 1:].mean(1)  # [CLS] row, patches only
    chosen = [pos[scores[b].topk(keep).indices] for b, pos in enumerate(visual_positions(inputs["input_ids"], IMAGE))]
    kept = with_text(inputs["input_ids"], IMAGE, chosen)
    assert torch.equal(out.kept[0], kept)
    embeds = hf_forward(model, inputs, output_hidden_states=True).hidden_states[0]
    ref = reference(model, inputs, embeds, kept, 0)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)
    assert all(out.cache.layers[i].keys.shape[2] == kept.shape[1] for i in range(3))


@pytest.mark.slow
def test_inspect_with_a_vision_layer_reports_vtc_cls_at_that_layer(llava):
    """tpc.inspect(vlm, vision_layer=i) with no method does what ``tpc inspect --vision-layer i`` does
    (topk-cls, the default method, at that layer), instead of silently describing the unpruned model."""
    import tpc

    model, inputs, _ = llava
    table = tpc.inspect(model, inputs, vision_layer=0, keep=4).table()
    assert "topk-cls: visual 16 -> 4 before the language model ([CLS] attention of vision layer 0)" in table
    with pytest.raises(TpcError, match="choose a vision layer from 0"):
        tpc.inspect(model, inputs, vision_layer=5)


@pytest.mark.slow
def test_keep_zero_drops_every_visual_token_after_a_layer(llava):
    model, inputs, program = llava
    out = prune(model, program, inputs, method="fastv", layers=[0, 1], keep=[0.5, 0]).prefill(**inputs)
    kept = out.kept[-1]
    assert kept.shape[1] == 24 - VISUAL and not (inputs["input_ids"].gather(1, kept) == IMAGE).any()
    assert [out.cache.layers[i].keys.shape[2] for i in range(3)] == [24, 16, 8]
    with pytest.raises(TpcError, match="text-only prompt"):
        prune(model, program, inputs, method="random", keep=0)


@pytest.mark.parametrize("change,message", [
    (lambda i: {**i, "input_ids": i["input_ids"].masked_fill(i["input_ids"] == IMAGE, 5)}, "no image token"),
    (lambda i: {**i, "pixel_values": i["pixel_values"][:1]}, "images make"),
    (lambda i: {"input_ids": torch.cat([i["input_ids"], torch.full((2, VISUAL), IMAGE)], 1),
                "attention_mask": torch.cat([i["attention_mask"], torch.ones(2, VISUAL, dtype=torch.long)], 1),
                "pixel_values": torch.cat([i["pixel_values"], i["pixel_values"]])}, "compiled for 16"),
    (lambda i: {**i, "pixel_values": torch.randn(2, 3, 64, 64)}, r"takes pixel_values \[images, 3, 32, 32\]"),
])
@pytest.mark.slow
def test_bad_inputs_are_refused_in_one_line(llava, change, message):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=0.5)
    with pytest.raises(TpcError, match=message) as err:
        pruned.generate(**change(inputs), max_new_tokens=2)
    assert "\n" not in str(err.value)
    if message != "compiled for 16":  # two images per prompt is a valid compile
        with pytest.raises(TpcError, match=message):
            compile_vlm(model, change(inputs), method="fastv", layers=1)


@pytest.mark.slow
def test_half_precision_pixels_run_as_the_stock_model_casts_them(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=0.5)
    half = {**inputs, "pixel_values": inputs["pixel_values"].half()}
    expected = pruned.prefill(**{**inputs, "pixel_values": half["pixel_values"].float()}).logits
    torch.testing.assert_close(pruned.prefill(**half).logits, expected, rtol=0, atol=0)
    assert half["pixel_values"].dtype == torch.float16  # the caller's tensor is untouched


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "fastv", "layers": 3}, "beyond the language model's depth"),
    ({"method": "fastv", "layers": 2}, "saves nothing"),
    ({"method": "fastv"}, "give the layer"),
    ({"method": "topk-cls", "layers": 1}, "before the language model: drop layers"),
    ({"method": "topk-cls", "vision_layer": 2}, "choose a vision layer from 0 to 1"),
    ({"method": "fastv", "layers": 1, "vision_layer": 0}, "fastv does not read the vision tower"),
    ({"method": "fastv", "layers": 1.5}, "layers are an index or a list"),
    ({"method": "random", "keep": [0.5, 0.25]}, "--keep has 2 values for 1 pruning stages"),
    ({"method": "fastv", "layers": [0, 1], "keep": [0.5, 0.5, 0.5]}, "--keep has 3 values for 2 pruning stages"),
    ({"method": "random", "seed": -3}, "--seed is an integer from 0 to 4294967295, not -3"),  # was taken
    ({"method": "random", "seed": 2**64}, "not 18446744073709551616"),  # was an internal error in tpc::random_scores
])
def test_bad_schedules_are_refused(llava, kwargs, message):
    model, inputs, program = llava
    with pytest.raises(TpcError, match=message) as err:
        prune(model, program, inputs, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_api_compiles_and_writes_a_checked_program(llava, tmp_path):
    import tpc

    model, inputs, program = llava
    with pytest.raises(TpcError, match="beyond the language model's depth"):  # tpc.compile hands VLMs to tpc.vlm
        tpc.compile(model, inputs, method="fastv", layers=7)
    pruned = prune(model, program, inputs, method="fastv", layers=0, keep=0.5)
    assert pruned.report.layer_tokens == [24, 16, 16] and "fastv: visual 16 -> 8" in pruned.report.table()
    result = tpc.export(pruned, tmp_path / "vlm.pt2")
    assert result.batches == (1, 2) and result.max_abs_error == 0.0
    program = torch.export.load(tmp_path / "vlm.pt2").module()
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
            prompt_positions(inputs["attention_mask"]))
    assert program(*args)[-1].shape == (2, 16)
    with pytest.raises(TpcError, match="TensorRT engines are written for encoders only"):
        tpc.export(pruned, tmp_path / "vlm.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm.pt2"]
    report = tpc.inspect(model, inputs)
    assert report.visual_span == (3, 18) and report.visual == VISUAL
    assert report.layer_tokens == [24, 24, 24] and report.tower == "CLIPVisionModel"
    pruned_report = tpc.inspect(model, inputs, method="divprune", keep=4)  # as tpc.compile: before the LM
    assert pruned_report.layer_tokens == [12, 12, 12] and "divprune: visual 16 -> 4" in pruned_report.table()


@pytest.mark.slow
def test_cli_refuses_a_layer_beyond_the_language_model(tmp_path, cli):
    tiny_llava().save_pretrained(tmp_path / "llava")
    bad = tmp_path / "bad.pt2"
    r = cli("compile", tmp_path / "llava", "--pass", "fastv", "--layers", "5", "-o", bad)
    assert r.returncode != 0 and sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
    last = r.stderr.strip().splitlines()[-1]  # above it only transformers' weight-loading progress bar
    assert last == "tpc: error: layer 5 is beyond the language model's depth: it has 3 decoder layers (0-2)"


@pytest.mark.slow
@pytest.mark.parametrize("method,layers", [("fastv", 1), ("divprune", None)])
def test_golden_graph(llava, method, layers, update_golden):
    model, inputs, program = llava
    check_golden(prune(model, program, inputs, method=method, layers=layers, keep=4).gm, f"vlm_llava_{method}",
                 update_golden)


def test_keep_as_text_as_the_cli_gives_it():
    from tpc.vlm.compile import stages_of
    from tpc.vlm.family import spec_of

    spec = spec_of(tiny_llava())
    assert stages_of(spec, VISUAL, "fastv", "1", "0.25") == stages_of(spec, VISUAL, "fastv", 1, 0.25)
    assert [s.tokens_out for s in stages_of(spec, VISUAL, "fastv", "0,1", "0.5,0")] == [8, 0]
    assert [s.tokens_out for s in stages_of(spec, VISUAL, "random", None, "5")] == [5]
    with pytest.raises(TpcError, match="--keep takes ratios"):
        stages_of(spec, VISUAL, "random", None, "half")


@pytest.mark.slow
def test_a_saved_vlm_is_a_vlm_whatever_method_and_layers_it_is_given(tmp_path):
    import tpc

    tiny_llava().save_pretrained(tmp_path / "llava")
    for method in ("divprune", "random"):  # methods encoders have too, with layers: still the VLM path
        with pytest.raises(TpcError, match="beyond the language model's depth"):
            tpc.compile(str(tmp_path / "llava"), method=method, layers=7)


@pytest.mark.parametrize("flag", [{"after": "block"}, {"r": 2}, {"prefix": 1}, {"restore": True}, {"seq_len": 40},
                                  {"options": "fuse=True"}, {"backend": "onnxruntime"}])
def test_encoder_only_settings_are_refused_on_a_vlm_not_ignored(llava, flag):
    import tpc

    model, inputs, _ = llava
    with pytest.raises(TpcError, match="a VLM takes method, layers, keep, seed and vision_layer only") as err:
        tpc.compile(model, inputs, method="fastv", layers=1, **({"keep": 0.5} if "r" not in flag else {}), **flag)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_tpc_imports_without_the_optional_transformers():
    import subprocess
    import sys

    code = "import sys; sys.modules['transformers'] = None; import tpc, tpc.cli, tpc.commands.bench, tpc.commands.eval, tpc.visualize"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]


@pytest.mark.slow
def test_commands_without_vlm_support_refuse_a_vlm_in_one_line(tmp_path):
    from tpc.commands.eval import run_eval
    from tpc.tune import run_tune
    from tpc.visualize import run_visualize

    tiny_llava().save_pretrained(tmp_path / "llava")
    path = str(tmp_path / "llava")
    for command, call in (("tune", lambda: run_tune(path, tmp_path / "d.npz", max_drop=1, mean="0.5", std="0.2")),
                          ("eval", lambda: run_eval(path, tmp_path, method="fastv", layers="1")),
                          ("visualize", lambda: run_visualize(path, tmp_path / "x.png", tmp_path / "v.png", method="fastv", layers="1"))):
        with pytest.raises(TpcError, match=f"tpc {command} does not take vision-language models yet") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_generate_refuses_settings_it_would_ignore(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="random", keep=0.5)
    for kwargs, message in (({"num_beams": 2}, "num_beams=2"), ({"repetition_penalty": 1.3}, "repetition_penalty"),
                            ({"max_new_token": 3}, "no option 'max_new_token'")):
        with pytest.raises(TpcError, match=message) as err:
            pruned.generate(**inputs, max_new_tokens=2, **kwargs)
        assert "\n" not in str(err.value)
    pruned.generate(**inputs, max_new_tokens=2, num_beams=1, repetition_penalty=1.0)  # neutral values are fine


@pytest.mark.slow
def test_text_only_prompt_generates_as_the_stock_model(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=0.5)
    text = {"input_ids": torch.tensor([[PAD, PAD, 1, 7, 9, 11], [1, 5, 8, 13, 21, 34]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
    with torch.no_grad():
        expected = model.generate(**text, max_new_tokens=4, do_sample=False)
    assert torch.equal(pruned.generate(**text, max_new_tokens=4), expected)
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    for call, message in ((lambda: pruned.generate(**no_pixels, max_new_tokens=2), "no pixel_values were given"),
                          (lambda: pruned(**no_pixels), "needs the processor's pixel_values")):
        with pytest.raises(TpcError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_keep_beyond_the_visual_tokens_names_the_stage(llava):
    model, inputs, program = llava
    for kwargs, where in (({}, "before the language model"), ({"layers": 1}, "after decoder layer 1")):
        with pytest.raises(TpcError, match=f"16 visual tokens per example reach the pruning point {where}") as err:
            prune(model, program, inputs, method="random", keep=20, **kwargs)
        assert "layer -1" not in str(err.value) and "\n" not in str(err.value)


def right_padded(inputs):
    """The same prompts padded on the right: each real token keeps its position (cumsum of the mask)."""
    ids, mask = [], []
    for row, m in zip(inputs["input_ids"], inputs["attention_mask"]):
        real_tokens = row[m.bool()]
        pad = len(row) - len(real_tokens)
        ids.append(torch.cat([real_tokens, torch.full((pad,), PAD)]))
        mask.append(torch.cat([torch.ones(len(real_tokens), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]))
    return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask), "pixel_values": inputs["pixel_values"]}


@pytest.mark.slow
def test_fastv_scores_with_the_last_real_token_under_right_padding(llava):
    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=4)
    left, right = inputs, right_padded(inputs)
    kept = {}
    for name, batch in (("left", left), ("right", right)):
        out = pruned.prefill(**batch)
        # the chosen visual tokens, as offsets within each example's visual span
        kept[name] = [sorted((p - pos[0]).item() for p in out.kept[0][b] if p in pos)
                      for b, pos in enumerate(visual_positions(batch["input_ids"], IMAGE))]
    assert kept["right"] == kept["left"]
    with pytest.raises(TpcError, match="right-padded") as err:
        pruned.generate(**right, max_new_tokens=2)
    assert "\n" not in str(err.value)



def test_last_token_attention_against_a_loop():
    """tpc::last_token_attention: each example's last real token, softmax over the keys up to it, head mean."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & valid.bool()[:, None, None, :]
    got = torch.ops.tpc.last_token_attention(q, k, 0.5, mask, valid)
    for b in range(2):
        last = int(torch.nonzero(valid[b])[-1])
        want = torch.zeros(6)
        for h in range(4):
            logits = torch.tensor([(q[b, h, last] @ k[b, h // 2, j]).item() * 0.5 if valid[b, j] and j <= last
                                   else float("-inf") for j in range(6)])
            want += torch.softmax(logits, 0) / 4
        assert torch.allclose(got[b], want, atol=1e-6)
    assert torch.allclose(torch.ops.tpc.last_token_attention(q, k, 0.5, mask, None)[1], got[1])  # last row is real


@pytest.mark.slow
def test_cli_lines_for_a_vlm(llava, tmp_path, capsys):
    """The one-line recipe `tpc compile` prints, and `tpc inspect` without --pass (the unpruned model)."""
    from tpc.cli import main
    from tpc.compiled import recipe

    model, inputs, program = llava
    assert recipe(prune(model, program, inputs, method="fastv", layers=[0, 1], keep=0.5).report) == \
        "fastv keep 8,4 after layers 0,1"
    assert recipe(prune(model, program, inputs, method="random", keep=4).report) == \
        "random keep 4 before the language model"
    model.save_pretrained(tmp_path / "llava")
    assert main(["inspect", str(tmp_path / "llava")]) == 0
    out = capsys.readouterr().out
    assert "3 attention layers" in out and "pruning" in out and "topk-cls" not in out


def lm_macs(tokens: list[int]) -> int:
    """Multiply-adds of the tiny LLaVA's prefill at batch 1, from the tokens each decoder layer
    sees, counted by hand from its config (not by tpc): vision tower, projector, decoder, head."""
    patches, vision_tokens, v_hidden, v_mlp, v_heads = 16, 17, 32, 64, 4  # CLIP: 16 patches + [CLS]
    vision = patches * v_hidden * 3 * 8 * 8  # patch-embedding convolution
    vision += 2 * (4 * vision_tokens * v_hidden ** 2 + 2 * vision_tokens * v_hidden * v_mlp
                   + v_heads * vision_tokens ** 2 * 2 * (v_hidden // v_heads))  # 2 layers: q,k,v,o, MLP, attention
    projector = 2 * VISUAL * 32 * 32  # two linears on the 16 visual tokens ([CLS] dropped)
    hidden, mlp, heads, kv_heads, vocab = 32, 64, 4, 2, 64
    d = hidden // heads

    def layer(t):  # q and o [h, h], k and v [h, kv·d] (grouped), gate/up/down MLP, attention over t keys
        return t * (2 * hidden * hidden + 2 * hidden * kv_heads * d) + 3 * t * hidden * mlp + heads * t * t * 2 * d

    return vision + projector + sum(layer(t) for t in tokens) + tokens[-1] * hidden * vocab


@pytest.mark.parametrize("kwargs,tokens,scoring", [
    ({"method": "fastv", "layers": 1, "keep": 4}, [24, 24, 12], 4 * 24 * 8),  # FastV's query row: H·S·d
    ({"method": "divprune", "keep": 4}, [12, 12, 12], 0),  # greedy selections are not counted (tpc/flops.py)
    ({"method": "random", "layers": [0, 1], "keep": 0.5}, [24, 16, 12], 0),
    ({"method": "random", "keep": 1.0}, [24, 24, 24], 0),
    ({"method": "fastv", "layers": 0, "keep": 1.0}, [24, 24, 24], 4 * 24 * 8),
])
@pytest.mark.slow
def test_prefill_flops_are_counted_on_the_graphs(llava, kwargs, tokens, scoring):
    """The report's FLOPs (tpc's counter on the captured and the rewritten graph) against a
    count by hand from the tokens each layer sees; keep 1.0 costs only the scoring."""
    import tpc.vlm

    model, inputs, program = llava
    pruned = prune(model, program, inputs, **kwargs)
    report = pruned.report
    assert report.flops_before == lm_macs([24, 24, 24])
    assert report.flops_after == lm_macs(tokens) + scoring
    assert report.flops_ratio == pytest.approx((lm_macs(tokens) + scoring) / lm_macs([24, 24, 24]))
    if tokens == [24, 24, 24] and not scoring:
        assert report.flops_ratio == 1.0
    assert tpc.vlm.prefill_gflops(pruned) == (report.flops_before / 1e9, report.flops_after / 1e9)
    assert tpc.vlm.prefill_flops(pruned.gm, 40).total == lm_macs([40 - 24 + t for t in tokens]) + scoring * 40 // 24
    assert f"({report.flops_ratio:.3f}x" in report.summary() and "prefill FLOPs at batch 1" in report.summary()


@pytest.mark.slow
def test_vtc_cls_scoring_is_counted_once_per_image_whatever_the_prompt_length(llava):
    """VTC-CLS's [CLS] row (``tpc::cls_attention`` at the feature layer: H·(P+1)·d multiply-adds per
    image) is in the report's scoring FLOPs, as docs/vlm.md says; it runs in the vision tower, so a
    longer prompt does not change it."""
    import tpc.vlm

    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="topk-cls", keep=4)
    cls_row = 4 * 17 * 8  # 4 heads, 16 patches + [CLS], head width 8
    assert pruned.report.flops_scoring == cls_row
    assert pruned.report.flops_after == lm_macs([12, 12, 12]) + cls_row
    assert tpc.vlm.prefill_flops(pruned.gm, 40).total == lm_macs([28, 28, 28]) + cls_row

@pytest.mark.slow
def test_vision_layer_is_refused_where_it_means_nothing(llava, tmp_path, capsys):
    """tpc.compile / tpc compile --vision-layer: one line for a non-VLM, a method that does not read
    the vision tower, a layer out of range; no file written."""
    import tpc
    from tpc.cli import main

    model, inputs, program = llava
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for call, message in (
            (lambda: tpc.compile(encoder, (torch.randn(2, 3, 4),), method="topk-cls", layers=0, vision_layer=0),
             "Sequential is not one: drop vision_layer"),
            (lambda: tpc.inspect(encoder, (torch.randn(2, 3, 4),), vision_layer=0), "is not one: drop vision_layer"),
            (lambda: tpc.compile(model, inputs, method="fastv", layers=1, vision_layer=0),
             "fastv does not read the vision tower"),
            (lambda: tpc.compile(model, inputs, method="topk-cls", vision_layer=2), "choose a vision layer from 0"),
            (lambda: tpc.compile(model, inputs, method="topk-cls", vision_layer=-1), "choose a vision layer from 0")):
        with pytest.raises(TpcError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    model.save_pretrained(tmp_path / "llava")
    out = tmp_path / "vlm.pt2"
    assert main(["compile", str(tmp_path / "llava"), "--pass", "topk-cls", "--vision-layer", "2", "-o", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tpc: error: vision_layer 2: choose a vision layer from 0 to 1")
    assert main(["compile", str(tmp_path / "llava"), "--pass", "random", "--vision-layer", "0", "-o", str(out)]) == 1
    assert "random does not read the vision tower" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
    assert main(["inspect", str(tmp_path / "llava"), "--vision-layer", "0", "--keep", "4"]) == 0
    assert "topk-cls: visual 16 -> 4 before the language model ([CLS] attention of vision layer 0)" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_bench_measures_prefill_decode_and_kv_cache_side_by_side(llava, tmp_path, capsys):
    """tpc bench on a VLM: prefill and decode-step latency, pruned against unpruned, KV-cache bytes
    and the FLOPs ratio, per batch size (and as --json); one line for a backend or a layer it cannot take."""
    import json

    from tpc.cli import main

    model, inputs, program = llava
    model.save_pretrained(tmp_path / "llava")
    path = str(tmp_path / "llava")
    fast = ["--warmup", "0", "--iters", "1", "--repeats", "1"]
    assert main(["bench", path, "--pass", "fastv", "--layers", "1", "--keep", "4", "--batch", "1,3", *fast]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "fastv keep 4 after layers 1" in lines[0] and "(0.875x) for the 25-token example prompt" in lines[0]
    assert lines[1].startswith("torch, ")
    for word in ("prefill ms unpruned -> pruned", "speedup (spread)", "FLOPs", "decode-step ms", "KV cache MB"):
        assert word in lines[2]
    # the unpruned cache holds 25 tokens in each of 3 layers, the pruned one 25, 25 and 25 - 16 + 4
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["1", "3"] and all(r[6] == "0.875x" and r[-1] == "0.840x" for r in rows)
    assert main(["bench", path, "--pass", "fastv", "--layers", "1", "--keep", "4", "--batch", "2", "--json", *fast]) == 0
    row, = json.loads(capsys.readouterr().out)["rows"]
    assert row["batch"] == 2 and row["kv_bytes"] == [2 * 2 * 2 * 8 * 4 * 3 * 25, 2 * 2 * 2 * 8 * 4 * (25 + 25 + 13)]
    assert row["kv_ratio"] == pytest.approx(63 / 75) and row["flops_ratio"] == pytest.approx(0.875, abs=5e-4)
    assert row["of_limit"] == pytest.approx(row["prefill"]["speedup"] * row["flops_ratio"])  # base / pruned median
    for args, message in ((["--backend", "onnxruntime"], "--backend onnxruntime is for encoders"),
                          (["--layers", "5"], "layer 5 is beyond the language model's depth")):
        assert main(["bench", path, "--pass", "fastv", "--keep", "4", "--layers", "1", *args, *fast]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("tpc: error:")


def test_bench_kv_bytes_decode_step_and_batches(llava):
    from tpc.vlm.bench import decode_step, kv_bytes, repeat_examples

    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers=1, keep=4)
    state, full = pruned.prefill(**inputs), pruned.unpruned().prefill(**inputs)
    per_token = 2 * 2 * 8 * 4  # keys and values, 2 key-value heads of width 8, float32
    assert kv_bytes(full) == 2 * per_token * 3 * 24 and kv_bytes(state) == 2 * per_token * (24 + 24 + 12)
    assert torch.allclose(full.logits, hf_forward(model, inputs).logits, atol=1e-5)  # the unpruned prefill
    step = decode_step(model, state)
    step()
    step()  # the cache is cut back after each step
    assert [layer.keys.shape[2] for layer in state.cache.layers] == [24, 24, 12]
    three = repeat_examples(inputs, 3)
    assert torch.equal(three["input_ids"], inputs["input_ids"][[0, 1, 0]])
    assert torch.equal(three["pixel_values"], inputs["pixel_values"][[0, 1, 0]])


@pytest.mark.slow
def test_loading_a_vlm_with_its_prompts_or_a_text_length(tmp_path, monkeypatch):
    """A module:function may return (VLM, processor outputs dict); --input-size N gives a VLM's
    example prompts N text tokens (one number, else one line)."""
    from tpc import models

    (tmp_path / "vlm_fn.py").write_text("import torch\nfrom test_vlm_llava import tiny_llava\n\n"
                                        "def make():\n    ids = torch.tensor([[1] + [63] * 16 + [5, 6, 7]])\n"
                                        "    return tiny_llava(), {'input_ids': ids, 'pixel_values': torch.zeros(1, 3, 32, 32)}\n")
    monkeypatch.chdir(tmp_path)
    loaded = models.load("vlm_fn:make")
    assert isinstance(loaded.example_inputs, dict) and loaded.example_inputs["input_ids"].shape == (1, 20)
    tiny_llava().save_pretrained(tmp_path / "llava")
    assert models.load(str(tmp_path / "llava"), input_size="12").example_inputs["input_ids"].shape == (2, 29)
    for size, said in (("3,32,32", "text tokens per prompt"), ("0", "every size is 1 or more")):
        with pytest.raises(TpcError, match=said) as err:
            models.load(str(tmp_path / "llava"), input_size=size)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_vtc_cls_on_a_vit_tower_reads_its_cls_attention():
    """A transformers ViTModel tower (its [CLS] is ``embeddings.cls_token``, its layers
    ``vision_tower.layers.<i>``): topk-cls keeps the top-k patches of the eager [CLS] attention row."""
    from transformers import ViTConfig

    def tiny(attn):
        torch.manual_seed(0)
        vision = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
        text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, pad_token_id=PAD)
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                                         vision_feature_layer=-2, attn_implementation=attn)).eval()

    model, keep = tiny("sdpa"), 5
    inputs = {"input_ids": torch.tensor([[1] + [IMAGE] * VISUAL + [5, 6]] * 2),
              "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    out = compile_vlm(model, inputs, method="topk-cls", keep=keep).prefill(**inputs)
    with torch.no_grad():
        attention = tiny("eager").model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    scores = attention[0][:, :, 0, 1:].mean(1)  # the feature layer (hidden_states[-2]: layer 0's output)
    chosen = [pos[scores[b].topk(keep).indices] for b, pos in enumerate(visual_positions(inputs["input_ids"], IMAGE))]
    assert torch.equal(out.kept[0], with_text(inputs["input_ids"], IMAGE, chosen))


def ort_outputs(path, args) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def left_padded(rows: list[tuple[int, int]], length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    padded = [prompt(before, after, length, gen) for before, after in rows]
    return {"input_ids": torch.tensor([r[0] for r in padded]), "attention_mask": torch.tensor([r[1] for r in padded]),
            "pixel_values": torch.randn(len(rows), 3, 32, 32, generator=gen)}


def assert_onnx_equals_torch(pruned, path, inputs, cut: int):
    """ONNX Runtime's logits and KV cache of the pruned prefill equal torch's at every real token
    (a padding token attends to nothing: its rows are unspecified), its kept positions exactly;
    layers before ``cut`` cache every prompt position, the others the kept ones."""
    mask = inputs["attention_mask"]
    args = (inputs["input_ids"], inputs["pixel_values"], mask, prompt_positions(mask))
    got = ort_outputs(path, args)
    with torch.no_grad():
        want = pruned.gm(*args)
    assert len(got) == len(want) == 1 + 2 * 3 + len(pruned.stages)
    kept = want[-1]
    assert torch.equal(got[-1], kept)
    every = torch.arange(mask.shape[1]).expand(mask.shape[0], -1)
    for i in range(3):
        real_tokens = mask.bool().gather(1, every if i < cut else kept)
        for g, w in zip(got[1 + 2 * i:3 + 2 * i], want[1 + 2 * i:3 + 2 * i]):
            assert g.shape == w.shape
            assert torch.allclose(g.transpose(1, 2)[real_tokens], w.transpose(1, 2)[real_tokens], atol=1e-5)
    rows = real(mask, kept)
    assert got[0].shape == want[0].shape and torch.allclose(got[0][rows], want[0][rows], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,layers,cut", [("fastv", 1, 2), ("divprune", None, 0)])
def test_onnx_prefill_equals_torch_at_any_batch_and_length(llava, tmp_path, method, layers, cut):
    """tpc.export(pruned, "vlm.onnx"): checked against the graph (batch 1 and the left-padded batch 2)
    and renamed into place; then run at the example batch and at batch 3 of 30-token prompts."""
    import tpc

    model, inputs, program = llava
    pruned = prune(model, program, inputs, method=method, layers=layers, keep=4)
    result = tpc.export(pruned, tmp_path / "vlm.onnx")
    assert result.batches == (1, 2) and result.max_abs_error < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm.onnx"]
    assert_onnx_equals_torch(pruned, tmp_path / "vlm.onnx", inputs, cut)
    longer = left_padded([(4, 6), (1, 2), (7, 5)], 30, seed=5)
    assert_onnx_equals_torch(pruned, tmp_path / "vlm.onnx", longer, cut)


@pytest.mark.slow
def test_onnx_prefill_of_todre_keep_zero(llava, tmp_path):
    """ToDRE's second stage (keep 0 after a layer) lowers to ONNX: its selection is an empty [B, 0] index."""
    import tpc

    model, inputs, program = llava
    pruned = prune(model, program, inputs, method="fastv", layers="0,1", keep="0.5,0")
    result = tpc.export(pruned, tmp_path / "todre.onnx")
    assert result.batches == (1, 2) and result.max_abs_error < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["todre.onnx"]


class ToyPrefill(torch.nn.Module):
    """A prefill in the shape tpc reads (image features scattered at the image tokens, a stack of
    SDPA decoder layers); ``extra`` adds a tensor of S + 1 positions made before the cut."""

    def __init__(self, extra: str):
        super().__init__()
        from test_graph_layers import Stack

        self.embed, self.model, self.extra = torch.nn.Embedding(64, 8), Stack(3), extra

    def forward(self, input_ids, attention_mask, features):
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        x = x.masked_scatter((input_ids == IMAGE).unsqueeze(-1).expand(-1, -1, 8), features)
        longer = torch.cat([x, x[:, :1]], 1).sum(-1, keepdim=True)  # S + 1 positions
        for i, layer in enumerate(self.model.layers):
            x = layer(x)
            if i == 2 and self.extra == "shifted":  # after the cut before layer 2
                x = x + longer[:, 1:]  # position t + 1 beside token t: a side tensor, gathered by the rules
            if i == 2 and self.extra == "joined":
                x = torch.cat([x, longer.expand(-1, -1, 8)], 1)[:, :x.shape[1]]  # joins S + 1 positions to the tokens
        return x


@pytest.mark.parametrize("extra", ["shifted", pytest.param("joined", marks=pytest.mark.slow)])
def test_tensors_cross_the_cut_by_the_token_axis_rules_of_encoders(extra):
    """What crosses the cut is carried by the shared token-axis rules (tpc/passes/token_axis_rules.py):
    a side tensor meeting the tokens is gathered with the kept positions; an op the rules cannot map
    (tokens joined to S + 1 other positions) is refused, naming the node."""
    from tpc.passes import PassManager
    from tpc.vlm.prune_visual import PruneVisual

    ids = torch.tensor([[1, 5] + [IMAGE] * 4 + [7, 8]] * 2)
    args = (ids, torch.ones_like(ids), torch.randn(8, 8))
    tokens = {0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", min=7, max=64)}
    model = ToyPrefill(extra).eval()
    gm = torch.export.export(model, args, dynamic_shapes=(tokens, tokens, None)).module()
    step = PruneVisual(2, "random", 4, 2, 8, IMAGE)  # after decoder layer 1
    if extra == "joined":
        with pytest.raises(TpcError, match=r"^cannot prune after decoder layer 1: node 'cat\w*' \(aten\.cat\) in "
                                           r"the top-level module: concatenates along the token axis \[in pass prune_visual\]$"):
            PassManager([step])(gm)
        return
    PassManager([step])(gm)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # flat outputs: the kept positions are one more
    gm.recompile()
    out, kept = gm(*args)
    with torch.no_grad():
        x = model.embed(ids)
        x = x.masked_scatter((ids == IMAGE).unsqueeze(-1).expand(-1, -1, 8), args[2])
        longer = torch.cat([x, x[:, :1]], 1).sum(-1, keepdim=True)
        for i, layer in enumerate(model.model.layers):
            if i == 2:
                x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, 8))
            x = layer(x)
            if i == 2 and extra == "shifted":
                x = x + longer[:, 1:].gather(1, kept.unsqueeze(-1))
    assert kept.shape == (2, 6)
    torch.testing.assert_close(out, x)


@pytest.mark.slow
def test_the_vision_layer_llava_never_reads_is_not_in_the_captured_prefill(llava):
    """A stock LLaVA reads its tower's layer -2: the last vision layer is dead code, removed after capture
    (its attention too, which fx would keep: it counts SDPA impure); the prefill still equals the stock model."""
    _, inputs, _ = llava
    model = tiny_llava()
    model.config.vision_feature_layer = -2
    program = capture_prefill(model, inputs)
    attentions = [n for n in program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(attentions) == 1 + 3  # vision layer 0 of 2, and the 3 decoder layers
    with torch.no_grad():
        expected = model(**inputs).logits
        out = program.module()(*program.example_inputs[0])
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, expected, atol=1e-5, rtol=1e-5)
