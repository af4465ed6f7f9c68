"""topk-cls on VLMs beyond one [CLS] layer: VTC-CLS's multi-layer ensemble on LLaVA (Wang et al.,
2024, arXiv 2412.05819: the [CLS] rows of several vision layers summed), and tpc's substitute on a
tower without [CLS] (SmolVLM's SigLIP-like tower): the attention each patch receives. The
references below are loops over layers, heads and queries on the eager model's
``output_attentions``; they call neither ``tpc.methods`` nor ``tpc.vlm``."""

from __future__ import annotations

import pytest
import torch

from test_vlm_llava import IMAGE, VISUAL, prompt, tiny_llava
from test_vlm_smolvlm import tiny_smolvlm
from tpc.errors import TpcError
from tpc.vlm import capture_prefill, compile_vlm, prune
from tpc.vlm.inputs import prompt_positions
from vlm_reference import check_golden, eager_from, real, visual_positions, with_text


def vtc_cls_scores(attentions, layers, drop):
    """VTC-CLS: s_j = Σ_{l in layers} (1/H) Σ_h A^l_h[CLS, j] ([CLS] is token 0), patches from ``drop`` on."""
    n, heads, tokens, _ = attentions[0].shape
    scores = torch.zeros(n, tokens)
    for layer in layers:
        for h in range(heads):
            scores += attentions[layer][:, h, 0, :] / heads
    return scores[:, drop:]


def received_scores(attentions, layers):
    """s_j = Σ_{l in layers} (1/(H·N)) Σ_h Σ_i A^l_h[i, j]: the attention patch j receives."""
    n, heads, tokens, _ = attentions[0].shape
    scores = torch.zeros(n, tokens)
    for layer in layers:
        for h in range(heads):
            for i in range(tokens):
                scores += attentions[layer][:, h, i, :] / (heads * tokens)
    return scores


def per_block(scores, s):
    """Each visual token of a pixel shuffle s is an s×s block of the patch grid (blocks in row-major
    order): its score is the mean of the block's patch scores."""
    n, patches = scores.shape
    side = int(patches ** 0.5)
    grid = scores.reshape(n, side, side)
    out = torch.zeros(n, (side // s) ** 2)
    for row in range(side // s):
        for col in range(side // s):
            out[:, row * (side // s) + col] = grid[:, row * s:(row + 1) * s, col * s:(col + 1) * s].mean((1, 2))
    return out


def kept_by(scores, input_ids, keep):
    chosen = [pos[scores[b].topk(keep).indices] for b, pos in enumerate(visual_positions(input_ids, IMAGE))]
    return with_text(input_ids, IMAGE, chosen)


def llava_inputs():
    gen = torch.Generator().manual_seed(1)
    rows = [prompt(2, 5, 24, gen), prompt(1, 3, 24, gen)]
    return {"input_ids": torch.tensor([r[0] for r in rows]), "attention_mask": torch.tensor([r[1] for r in rows]),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}


def smol_inputs():
    gen = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 60, (a,), generator=gen).tolist() + [IMAGE] * VISUAL
               + torch.randint(3, 60, (b,), generator=gen).tolist() for a, b in ((2, 5), (1, 3))]
    length = max(map(len, prompts))
    return {"input_ids": torch.tensor([[0] * (length - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts]),
            "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=gen)}


@pytest.fixture(scope="module")
def llava():
    model, inputs = tiny_llava(), llava_inputs()
    return model, inputs, capture_prefill(model, inputs)


@pytest.fixture(scope="module")
def smol():
    model, inputs = tiny_smolvlm(), smol_inputs()
    return model, inputs, capture_prefill(model, inputs)


def language_model(model):
    core = model.model
    return core.text_model if hasattr(core, "text_model") else core.language_model


def eager_reference(model, inputs, kept):
    """The stock decoder layers run on the kept tokens of the embedded prompt (image features scattered in)."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        embeds = model(**inputs, position_ids=prompt_positions(mask), output_hidden_states=True).hidden_states[0]
    return eager_from(language_model(model), model.lm_head, embeds, kept, 0, mask, prompt_positions(mask))


def eager_attentions(family, model, inputs):
    """The eager twin's vision-tower attention weights, one [images, H, T, T] tensor per layer."""
    eager = (tiny_llava if family == "llava" else tiny_smolvlm)("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        if family == "llava":
            return eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
        pixels = inputs["pixel_values"].flatten(0, 1)
        patches = torch.ones(pixels.shape[0], 8, 8, dtype=torch.bool)
        return eager.model.vision_model(pixel_values=pixels, patch_attention_mask=patches,
                                        output_attentions=True).attentions


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[0, 1], (1, 0), [0], 0])
def test_vtc_cls_ensemble_sums_the_cls_rows_of_the_chosen_layers(llava, layers):
    """LLaVA: the kept set is the top K of the [CLS] rows summed over the chosen vision layers (one
    layer as before), and the logits are the stock decoder layers' on the kept tokens."""
    model, inputs, program = llava
    keep = 6
    pruned = prune(model, program, inputs, method="topk-cls", keep=keep, vision_layer=layers)
    chosen = sorted(layers) if isinstance(layers, (list, tuple)) else [layers]
    which = (f"vision layer {chosen[0]}" if len(chosen) == 1
             else f"vision layers {', '.join(map(str, chosen))}, summed")
    assert f"([CLS] attention of {which})" in pruned.report.table()
    out = pruned.prefill(**inputs)
    scores = vtc_cls_scores(eager_attentions("llava", model, inputs), chosen, 1)  # "default": [CLS] is no visual token
    kept = kept_by(scores, inputs["input_ids"], keep)
    assert torch.equal(out.kept[0], kept)
    ref = eager_reference(model, inputs, kept)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, [0, 1], 0])
def test_smolvlm_scores_by_the_attention_each_patch_receives(smol, layers):
    """SmolVLM (no [CLS]): a patch's score is the attention it receives (mean over heads and queries,
    summed over the layers; default the last), a visual token's the mean over its pixel-shuffle block."""
    model, inputs, program = smol
    keep = 5
    pruned = prune(model, program, inputs, method="topk-cls", keep=keep, vision_layer=layers)
    chosen = [1] if layers is None else layers if isinstance(layers, list) else [layers]
    assert "attention received at vision layer" in pruned.report.table()
    out = pruned.prefill(**inputs)
    patches = received_scores(eager_attentions("smolvlm", model, inputs), chosen)
    kept = kept_by(per_block(patches, model.config.scale_factor), inputs["input_ids"], keep)
    assert torch.equal(out.kept[0], kept)
    ref = eager_reference(model, inputs, kept)
    rows = real(inputs["attention_mask"], kept)
    assert torch.allclose(out.logits[rows], ref[rows], atol=1e-5)


def tiny_siglip_llava(attn="sdpa"):
    """LLaVA with a one-layer SigLIP tower (no [CLS]) and the "full" feature strategy: 16 patches, 16 tokens."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                     attn_implementation=attn)).eval()


@pytest.mark.slow
def test_llava_with_a_siglip_tower_scores_by_the_attention_each_patch_receives():
    """LLaVA's tower without [CLS] (SigLIP): each patch is a visual token, scored by the attention it receives."""
    model, keep = tiny_siglip_llava(), 6
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 7] + [IMAGE] * VISUAL + [5, 6], [1, 9] + [IMAGE] * VISUAL + [8, 6]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 32, 32,
                                                                                                    generator=gen)}
    pruned = compile_vlm(model, inputs, method="topk-cls", keep=keep, vision_layer=[0])
    assert "(attention received at vision layer 0)" in pruned.report.table()
    out = pruned.prefill(**inputs)
    eager = tiny_siglip_llava("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    kept = kept_by(received_scores(attentions, [0]), ids, keep)
    assert torch.equal(out.kept[0], kept)
    ref = eager_reference(model, inputs, kept)
    assert torch.allclose(out.logits, ref, atol=1e-5)


@pytest.mark.slow
def test_per_block_is_what_the_connectors_pixel_shuffle_joins(smol):
    """The reference's s×s blocks are the patches the stock connector's pixel_shuffle puts in each token."""
    model, _, _ = smol
    ids = torch.arange(64.0).reshape(1, 64, 1)
    shuffled = model.model.connector.pixel_shuffle(ids, model.config.scale_factor)[0]  # [16 tokens, 4 patches]
    grid = torch.arange(64.0).reshape(8, 8)
    for token in range(16):
        block = grid[(token // 4) * 2:(token // 4) * 2 + 2, (token % 4) * 2:(token % 4) * 2 + 2]
        assert sorted(shuffled[token].tolist()) == sorted(block.flatten().tolist())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "smolvlm"])
def test_keep_every_visual_token_is_the_stock_model(llava, smol, family):
    """keep = all visual tokens: the prefill's logits are the stock model's and generate() is model.generate()."""
    model, inputs, program = llava if family == "llava" else smol
    pruned = prune(model, program, inputs, method="topk-cls", keep=VISUAL, vision_layer=[0, 1])
    out = pruned.prefill(**inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=prompt_positions(inputs["attention_mask"])).logits
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    valid = inputs["attention_mask"].bool()
    assert out.logits.shape == ref.shape and torch.allclose(out.logits[valid], ref[valid], atol=1e-5)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=4), expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "smolvlm"])
def test_batch_equals_each_example_alone(llava, smol, family):
    model, inputs, program = llava if family == "llava" else smol
    pruned = prune(model, program, inputs, method="topk-cls", keep=5, vision_layer=[0, 1])
    out = pruned.prefill(**inputs)
    for b in range(2):
        real_tokens = inputs["attention_mask"][b].bool()
        alone = {"input_ids": inputs["input_ids"][b:b + 1, real_tokens],
                 "attention_mask": inputs["attention_mask"][b:b + 1, real_tokens],
                 "pixel_values": inputs["pixel_values"][b:b + 1]}
        single = pruned.prefill(**alone)
        rows = real(inputs["attention_mask"], out.kept[0])[b]
        assert torch.equal(out.kept[0][b, rows] - int((~real_tokens).sum()), single.kept[0][0])
        assert torch.allclose(out.logits[b, rows], single.logits[0], atol=1e-5)


@pytest.mark.parametrize("family,layers,message", [
    ("llava", [0, 2], r"vision_layer \[0, 2\]: choose a vision layer from 0 to 1 \(the layer LLaVA takes"),
    ("llava", [], r"vision_layer \[\] names no layer: give one vision layer or several, from 0 to 1"),
    ("llava", [1, 1], r"vision_layer \[1, 1\] names a layer twice"),
    ("llava", [0, "1"], r"choose a vision layer from 0 to 1"),
    ("llava", [True], r"choose a vision layer from 0 to 1"),
    ("smolvlm", [0, 2], r"vision_layer \[0, 2\]: choose a vision layer from 0 to 1 \(the vision model's last"),
    ("smolvlm", -1, r"choose a vision layer from 0 to 1")])
def test_bad_vision_layers_are_refused_in_one_line_before_capture(family, layers, message):
    model, inputs = (tiny_llava(), llava_inputs()) if family == "llava" else (tiny_smolvlm(), smol_inputs())
    with pytest.raises(TpcError, match=message) as err:
        compile_vlm(model, inputs, method="topk-cls", keep=4, vision_layer=layers)
    assert "\n" not in str(err.value)


def test_vision_layer_flag_takes_one_layer_or_a_list():
    from tpc.commands.arguments import vision_layer

    assert vision_layer(None) is None
    assert vision_layer("1") == 1
    assert vision_layer("10,11,12") == [10, 11, 12]
    assert vision_layer(" 0, 1 ") == [0, 1]
    assert vision_layer("") == []
    for bad in ("a", "1,x", "1.5", "3,"):
        with pytest.raises(TpcError, match=r"--vision-layer .*: give a vision layer number or several") as err:
            vision_layer(bad)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_takes_a_list_of_vision_layers(llava, tmp_path, capsys):
    from tpc.cli import main

    model, _, _ = llava
    model.save_pretrained(tmp_path / "llava")
    assert main(["inspect", str(tmp_path / "llava"), "--vision-layer", "0,1", "--keep", "4"]) == 0
    assert ("topk-cls: visual 16 -> 4 before the language model ([CLS] attention of vision layers 0, 1, summed)"
            in capsys.readouterr().out)
    out = tmp_path / "vlm.pt2"
    assert main(["compile", str(tmp_path / "llava"), "--pass", "topk-cls", "--vision-layer", "0,2", "-o",
                 str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("tpc: error: vision_layer [0, 2]: choose a vision layer from 0 to 1")
    assert main(["compile", str(tmp_path / "llava"), "--pass", "topk-cls", "--vision-layer", "0,x", "-o",
                 str(out)]) == 1
    assert "--vision-layer '0,x': give a vision layer number" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]


@pytest.mark.slow
def test_golden_graph_smolvlm_attention_received(smol, update_golden):
    model, inputs, program = smol
    check_golden(prune(model, program, inputs, method="topk-cls", keep=4, vision_layer=[0, 1]).gm,
                 "vlm_smolvlm_topk_cls_received", update_golden)
