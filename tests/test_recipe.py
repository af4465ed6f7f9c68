"""Recipes: a method per layer (mixed recipes), the recipe file, and `tpc compile --recipe`."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import tpc
from lanes import first_fast
from models import TEST_MODELS, tiny_timm_vit
from reference import eager_timm_vit
from test_golden import GOLDEN, _check_text
from tpc.exports.checks import run_graph
from tpc.exports.onnx import with_decision_outputs
from tpc.graph.printing import format_rewrites
from tpc.recipe import Recipe, Step, load_recipe


# (recipe steps, the eager reference's schedule and per-layer methods) on the 17-token tiny timm ViT
MIXED_VS_EAGER = {
    "tome-then-topk-cls": ([{"layer": 0, "method": "tome", "r": 4}, {"layer": 2, "method": "topk-cls", "keep": 0.6}],
                           {0: 12, 2: 0.6}, {0: "tome", 2: "topk-cls"}),
    "tome-kcenter-tome": ([{"layer": 0, "method": "tome", "r": 3}, {"layer": 1, "method": "kcenter", "keep": 0.8},
                           {"layer": 2, "method": "tome", "r": 2}],
                          {0: 13, 1: 0.8, 2: 9}, {0: "tome", 1: "kcenter", 2: "tome"}),
    "topk-mass-then-tome": ([{"layer": 0, "method": "topk-mass", "keep": 0.75}, {"layer": 2, "method": "tome", "r": 3}],
                            {0: 0.75, 2: 9}, {0: "topk-mass", 2: "tome"}),
}


@pytest.mark.parametrize("case", first_fast(MIXED_VS_EAGER))
def test_mixed_recipe_matches_the_eager_reference(case):
    steps, schedule, methods = MIXED_VS_EAGER[case]
    model = tiny_timm_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    pm = tpc.compile(model, x[:2], recipe=steps)
    assert [s.method for s in pm.report.sites if s.kept is not None] == [methods[i] for i in sorted(methods)]
    torch.testing.assert_close(pm(x), eager_timm_vit(model, x, schedule, method=methods), atol=1e-5, rtol=1e-5)


def _mixed(depth: int) -> list[dict]:
    """Merge early, prune by importance in the last layer; and the other way round is in MIXED_VS_EAGER."""
    return [{"layer": 0, "method": "tome", "r": 3}, {"layer": depth - 1, "method": "topk-mass", "keep": 0.6}]


@pytest.mark.parametrize("name", first_fast(TEST_MODELS))
def test_mixed_recipe_golden_graph_and_outputs(name, update_golden):
    factory, inputs, depth, _ = TEST_MODELS[name]
    pm = tpc.compile(factory(), inputs(2), recipe=_mixed(depth))
    _check_text(GOLDEN / f"{name}_mixed_tome_topk-mass.txt", format_rewrites(pm.graph_module), update_golden)
    out = pm(*inputs(3, seed=11)).numpy()
    path = GOLDEN / f"{name}_mixed_tome_topk-mass.npz"
    if update_golden:
        np.savez(path, output=out)
    np.testing.assert_allclose(out, np.load(path)["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", first_fast(TEST_MODELS))
def test_mixed_recipe_onnx_runtime_parity(tmp_path, name):
    factory, inputs, depth, _ = TEST_MODELS[name]
    pm = tpc.compile(factory(), inputs(2), recipe=_mixed(depth))
    path = tmp_path / "m.onnx"
    tpc.export(pm, path, check=False)  # checked below, with the kept indices too
    import onnx

    probe, count = with_decision_outputs(onnx.load(path))
    assert count == 1  # topk-mass's kept indices; the merge has none
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = inputs(batch, seed=30 + batch)
        out, *decisions = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})
        ref, replay = run_graph(pm.graph_module, x)
        assert abs(torch.from_numpy(out) - ref[0]).max() <= 1e-4
        for got, want in zip(decisions, replay.decisions):
            assert torch.equal(torch.from_numpy(got), want)


def test_single_pass_form_is_a_recipe_of_one_method():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    model = factory()
    by_pass = tpc.compile(model, inputs(2), method="zero-tprune", layers=[1, 3], keep=[0.7, 0.5])
    by_recipe = tpc.compile(model, inputs(2), recipe=[{"layer": 3, "method": "zero-tprune", "keep": 0.5},
                                                      {"layer": 1, "method": "zero-tprune", "keep": 0.7}])
    assert by_pass.graph_module.code == by_recipe.graph_module.code
    assert by_recipe.report.method == "zero-tprune" and by_recipe.report.layers == [1, 3]


def test_recipe_file_round_trip(tmp_path):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    model = factory()
    recipe = Recipe([Step(0, "tome", r=3), Step(2, "topk-cls", keep=0.5, options={"fuse": False})],
                    info={"model": "tiny", "metric": {"name": "agreement"}})
    path = recipe.save(tmp_path / "recipe.json")
    data = json.loads(path.read_text())
    assert data["format"] == "tpc-recipe/1" and data["tpc_version"] == tpc.__version__ and data["model"] == "tiny"
    back = load_recipe(path)
    assert back.steps == recipe.steps and back.info["metric"] == {"name": "agreement"}
    pm = tpc.compile(model, inputs(2), recipe=path)  # the numbers a compiled file gives: tests/test_tune.py
    assert [s.method for s in pm.report.sites if s.kept is not None] == ["tome", "topk-cls"]


@pytest.mark.parametrize(("steps", "message"), [
    ([{"layer": 0, "method": "tome", "r": 2}, {"layer": 1, "method": "topk-cls", "keep": 0.5, "options": {"fuse": True}}],
     "cannot follow a tome step"),
    ([{"layer": 1, "method": "tome", "r": 2}, {"layer": 1, "method": "random", "keep": 0.5}], "listed twice"),
    ([{"layer": 1, "method": "tome", "r": 2, "keep": 0.5}], "exactly one of keep and r"),
    ([{"layer": 1, "method": "tome", "ratio": 2}], "unknown key 'ratio'"),
    ([{"layer": 1, "method": "nope", "keep": 0.5}], "unknown pruning method"),
    ([], "no steps"),
    ({"steps": [{"layer": 1, "method": "random", "keep": 0.5}], "seed": "x"}, "'seed' is an integer"),
])
def test_illegal_recipes_are_refused_in_one_line(steps, message):
    with pytest.raises(tpc.TpcError, match=message) as err:
        load_recipe(steps)
    assert "\n" not in str(err.value)


def test_a_recipe_tuned_on_another_model_is_compiled_with_a_warning(caplog):
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    recipe = {"steps": [{"layer": 1, "method": "random", "keep": 0.5}], "model": "some-other-model"}
    with caplog.at_level("WARNING", logger="tpc"):
        tpc.compile(factory(), inputs(2), recipe=recipe)
    assert "the recipe was tuned on some-other-model, not VisionTransformer" in caplog.text


def test_fuse_before_a_merge_is_legal():
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), recipe=[{"layer": 0, "method": "topk-cls", "keep": 0.75, "options": {"fuse": True}},
                                                   {"layer": 2, "method": "tome", "r": 2}])
    assert [s.kept for s in pm.report.sites] == [14, None, 12, None]


@pytest.mark.slow
def test_cli_compile_reads_a_recipe_and_refuses_recipe_with_layers(tmp_path, capsys):
    from tpc.cli import main

    recipe = tmp_path / "r.json"
    Recipe([Step(0, "tome", r=2), Step(2, "random", keep=0.5)]).save(recipe)
    out = tmp_path / "m.pt2"
    # .pt2, --no-check: test_mixed_recipe_onnx_runtime_parity runs mixed recipes' ONNX exports in ONNX Runtime
    assert main(["compile", "models:cli_tiny_vit", "--recipe", str(recipe), "-o", str(out), "--no-check"]) == 0
    assert out.is_file() and "tome@0 r=2, random@2 keep 0.5" in capsys.readouterr().out
    assert main(["compile", "models:cli_tiny_vit", "--recipe", str(recipe), "--layers", "1", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "--recipe replaces" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("flags", [{"keep": 0.5}, {"layers": [1]}, {"r": 2}, {"options": "fuse=True"}])
def test_recipe_with_schedule_keywords_is_refused_before_loading(flags):
    with pytest.raises(tpc.TpcError, match="give either a recipe or method/layers/keep/r/options, not both"):
        tpc.compile("no-such-model", recipe=[{"layer": 0, "method": "tome", "r": 2}], **flags)


def test_per_layer_keep_and_r_travel_with_their_layers():
    """Layers given out of depth order keep the value written beside them (`--layers 2,0 --keep 0.5,0.9`)."""
    from tpc.recipe import check_steps, steps_from_pass

    steps = check_steps(steps_from_pass("topk-cls", "2,0", "0.5,0.9"))
    assert [(s.layer, s.keep) for s in steps] == [(0, 0.9), (2, 0.5)]
    steps = check_steps(steps_from_pass("tome", [3, 1], r=[2, 5]))
    assert [(s.layer, s.r) for s in steps] == [(1, 5), (3, 2)]
    schedule = check_steps(steps_from_pass("tome", [3, 0, 1], r=(4, -1.0)))  # ToMe's schedule runs in depth order
    assert [s.r for s in schedule] == [s.r for s in check_steps(steps_from_pass("tome", [0, 1, 3], r=(4, -1.0)))]

    model, inputs = tiny_timm_vit(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    swapped = tpc.compile(model, inputs, layers=[2, 0], keep=[0.5, 0.9])
    ordered = tpc.compile(model, inputs, layers=[0, 2], keep=[0.9, 0.5])
    assert [s.kept for s in swapped.report.sites] == [s.kept for s in ordered.report.sites]
    assert torch.equal(swapped(*inputs), ordered(*inputs))


def test_every_kind_of_model_parses_its_settings_into_steps():
    """One normal form: encoder, VLM and decode settings are parsed into Steps by tpc.recipe, values
    travelling with their layers, in layer order; the same bad value gets the same line everywhere."""
    from tpc.recipe import Step, decode_steps, steps_from_pass, visual_steps

    assert steps_from_pass("kcenter", "2,0", "0.5,9") == [Step(2, "kcenter", 0.5), Step(0, "kcenter", 9)]
    assert visual_steps("kcenter", "2,0", "0.5,0") == [Step(0, "kcenter", 0), Step(2, "kcenter", 0.5)]
    assert visual_steps("kcenter", None, "5") == [Step(-1, "kcenter", 5)]  # before the language model
    assert decode_steps("tidal", "3,1", "8", maximum=16) == [Step(1, "tidal", 8), Step(3, "tidal", 8)]
    assert decode_steps("tidal", None, None, maximum=512, default_layers=[2]) == [Step(2, "tidal", 256)]
    assert decode_steps("quest", "1", "0.25", maximum=16) == [Step(1, "quest", 0.25)]  # a ratio of the cache
    for parse in (lambda: steps_from_pass("kcenter", "0,x", 0.5), lambda: visual_steps("kcenter", "0,x", 0.5),
                  lambda: decode_steps("tidal", "0,x", 4, maximum=16)):
        with pytest.raises(tpc.TpcError, match=r"^--layers takes comma-separated layer indices such as 3,6,9, "
                                               r"not '0,x'$"):
            parse()
    for parse in (lambda: steps_from_pass("kcenter", 0, 1.5), lambda: visual_steps("kcenter", 0, 1.5),
                  lambda: decode_steps("tidal", None, 1.5, maximum=16)):
        with pytest.raises(tpc.TpcError, match=r"^keep ratio 1.5 is outside \(0, 1\]"):
            parse()
    with pytest.raises(tpc.TpcError, match="keep 0 drops every visual token; before the language model"):
        visual_steps("kcenter", None, 0)
    with pytest.raises(tpc.TpcError, match="keep 0 is not positive"):
        steps_from_pass("kcenter", 0, 0)
    with pytest.raises(tpc.TpcError, match="more than the 16 cached positions"):
        decode_steps("tidal", None, 17, maximum=16)
    with pytest.raises(tpc.TpcError, match="'topk-mass' does not prune visual tokens"):
        visual_steps("topk-mass", None, 0.5)
    with pytest.raises(tpc.TpcError, match="'kcenter' is not a decode-time method"):
        decode_steps("kcenter", None, 4, maximum=16)
