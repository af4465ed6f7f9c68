"""Hostile and mistaken input, third round (issue 22): no model directory's code runs, no input is
overwritten, reproducible ``.pt2`` files, and one line for every bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from models import cli_tiny_vit
from test_hardening import TESTS, TIMM_TINY, TINY, assert_refused, bad_files  # noqa: F401 (a fixture)
from tpc.errors import TpcError

CUSTOM_CODE = """open({marker!r}, "w").close()
from transformers import BertConfig, BertModel
class EvilConfig(BertConfig):
    model_type = "evil"
class EvilModel(BertModel):
    config_class = EvilConfig
"""


def test_a_model_directory_s_own_code_never_runs_even_when_the_user_says_yes(capsys, tmp_path, monkeypatch):
    """``auto_map`` asks transformers to import the directory's .py files; tpc answers no, never asks."""
    from families import hf_bert

    model, marker = tmp_path / "evil", tmp_path / "marker"
    hf_bert().save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "configuration_evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a user who would answer a prompt with yes
    out = tmp_path / "m.onnx"
    assert_refused(capsys, ["compile", model, "--layers", "0", "-o", out], "custom code", "not")
    assert_refused(capsys, ["compile", model, "--random-weights", "--layers", "0", "-o", out], "custom code")
    assert_refused(capsys, ["compile", model, "--model-args", "trust_remote_code=True", "--layers", "0", "-o", out],
                   "trust_remote_code")
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_the_same_compile_in_two_processes_writes_the_same_pt2_bytes(tmp_path):
    """Node provenance once held memory addresses and the archive a random id: now same input, same bytes."""
    args = [sys.executable, "-m", "tpc", "compile", TINY, "--layers", "1", "--keep", "0.5", "--no-check", "-o"]
    runs = [subprocess.Popen([*args, str(tmp_path / name)], cwd=TESTS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for name in ("a.pt2", "b.pt2")]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()
    assert (tmp_path / "a.pt2").read_bytes() == (tmp_path / "b.pt2").read_bytes()


def test_no_output_overwrites_an_input_and_a_recipe_is_json(capsys, bad_files, tmp_path):
    """Item 2: the model, its weights and the data are never written over by -o or --plot; item 8."""
    import shutil

    d = shutil.copytree(bad_files, tmp_path / "in")
    model, weights, data = d / "linear.pt2", d / "wrong_shape.pt", d / "u8.npz"
    before = {p: p.read_bytes() for p in (model, weights, data)}
    tune = ["tune", model, "--data", data, "--max-drop", "1"]
    for args, words in [
        ([*tune, "-o", model], "a .json name"),
        ([*tune, "-o", tmp_path / "x.onnx"], "a .json name"),
        ([*tune, "-o", tmp_path / "r.json", "--plot", model], "the model you tune"),
        ([*tune, "-o", tmp_path / "r.json", "--plot", data], "the --data file"),
        ([*tune, "-o", tmp_path / "r.json", "--plot", tmp_path / "r.json"], "also -o"),
        (["tune", *TIMM_TINY, "--weights", weights, "--data", data, "--max-drop", "1", "-o", tmp_path / "r.json",
          "--plot", weights], "the --weights file"),
        (["eval", model, "--data", data, "--plot", model], "the model you evaluate"),
        (["eval", model, "--data", data, "--plot", data], "the --data file"),
        (["eval", *TIMM_TINY, "--weights", weights, "--data", data, "--plot", weights], "the --weights file"),
    ]:
        assert_refused(capsys, args, words)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
def test_recipe_refuses_after_and_seed_and_the_two_seeds_are_apart(capsys, tmp_path):
    """Item 9: --after/--seed with --recipe were ignored; --seed once drew --random-weights too."""
    import tpc
    from tpc.models import load
    from tpc.recipe import Recipe, Step

    recipe = Recipe([Step(0, "random", 0.5)], seed=3).save(tmp_path / "r.json")
    for flag in (["--seed", "5"], ["--after", "block"], ["--seed", "0"]):
        assert_refused(capsys, ["compile", TINY, "--recipe", recipe, *flag, "-o", tmp_path / "m.onnx"], flag[0],
                       "recipe")
    with pytest.raises(TpcError, match="recipe holds its own"):
        tpc.compile(*cli_tiny_vit(), recipe=recipe, seed=7)
    assert_refused(capsys, ["inspect", *TIMM_TINY, "--weights-seed", "1"], "--weights-seed", "--random-weights")
    args = dict(random_weights=True, model_args="img_size=32,depth=1")
    weights = load("vit_tiny_patch16_224", **args).module.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in load("vit_tiny_patch16_224", **args, weights_seed=0).module
               .state_dict().items())
    model, inputs = cli_tiny_vit()
    a, b = (tpc.compile(model, inputs, method="random", layers=[1], keep=0.5, seed=s)(*inputs) for s in (0, 9))
    assert not torch.equal(a, b)  # --seed still draws the random method
    assert list(tmp_path.iterdir()) == [recipe]


@pytest.mark.parametrize("value", ["99999999999999999999", "-1"])
def test_seeds_beyond_a_generator_s_range_are_the_user_s_mistake(capsys, value):
    """Item 13: --seed 99999999999999999999 was an internal error."""
    assert_refused(capsys, ["inspect", TINY, "--pass", "random", "--layers", "1", "--seed", value], "--seed",
                   "4294967295")
    assert_refused(capsys, ["inspect", *TIMM_TINY, "--random-weights", "--weights-seed", value], "--weights-seed")


def test_unreadable_and_odd_files_say_what_is_wrong(capsys, bad_files, tmp_path, monkeypatch):
    """Items 13, 14, 26, 27: deep or huge JSON, directories, unreadable files, suffix case, odd archives."""
    import builtins
    import shutil
    import zipfile

    d = bad_files
    (tmp_path / "deep.json").write_text("[" * 100000)
    (tmp_path / "digits.json").write_text('{"steps": [{"layer": ' + "7" * 5000 + ', "method": "random", "keep": 0.5}]}')
    (tmp_path / "dir.pt2").mkdir()
    shutil.copy(d / "linear.pt2", tmp_path / "UPPER.PT2")
    for name, member, data in (("escape", "archive/../../x", b"x"), ("bomb", "archive/data/zeros", bytes(2**24))):
        with zipfile.ZipFile(d / "linear.pt2") as src, zipfile.ZipFile(tmp_path / f"{name}.pt2", "w") as archive:
            for info in src.infolist():
                archive.writestr(info, src.read(info.filename))
            archive.writestr(zipfile.ZipInfo(member), data, compress_type=zipfile.ZIP_DEFLATED)
    out = tmp_path / "m.onnx"
    for args, words in [
        (["compile", TINY, "--recipe", tmp_path / "deep.json", "-o", out], ("not valid JSON", "nested too deeply")),
        (["compile", TINY, "--recipe", tmp_path / "digits.json", "-o", out], ("not valid JSON",)),
        (["compile", TINY, "--recipe", tmp_path, "-o", out], ("is a directory",)),
        (["inspect", tmp_path / "dir.pt2", "--layers", "0"], ("is a directory",)),
        (["inspect", tmp_path / "UPPER.PT2", "--layers", "0", "--model-args", "a=1"], ("cannot apply to a .pt2",)),
        (["inspect", tmp_path / "escape.pt2", "--layers", "0"], ("'archive/../../x' points outside the archive",)),
        (["inspect", tmp_path / "bomb.pt2", "--layers", "0"], ("expands from", "to 16,777,216 bytes")),
    ]:
        assert_refused(capsys, args, *words)
    denied = {str(d / "u8.npz"), str(d / "wrong_shape.pt"), str(tmp_path / "deep.json")}
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):  # root reads any file: deny these as chmod 000 does for a user
        if str(file) in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    for args in (["eval", TINY, "--data", d / "u8.npz", "--mean", "0.5", "--std", "0.5"],
                 ["inspect", *TIMM_TINY, "--weights", d / "wrong_shape.pt"],
                 ["compile", TINY, "--recipe", tmp_path / "deep.json", "-o", out]):
        assert_refused(capsys, args, "permission denied")
    assert not out.exists()


@pytest.mark.parametrize(("arrays", "words"), [
    (lambda ids, mask: {"mask": mask, "ids": ids}, ["names its input arrays mask, ids", "input_ids, attention_mask"]),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask * 7}, ["other than 0 and 1"]),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask * 0}, ["all zeros"]),
])
def test_token_arrays_are_matched_by_name_and_masks_checked(tmp_path, arrays, words):
    """Item 10: arrays were taken in file order (a mask fed as ids) and masks never checked."""
    import numpy as np

    from families import hf_bert, text_inputs
    from tpc.tune import run_tune

    ids, mask = (t.numpy() for t in text_inputs(6, padded=False))
    data = tmp_path / "text.npz"
    np.savez(data, **arrays(ids, mask))
    with pytest.raises(TpcError) as err:
        run_tune(hf_bert(), data, max_drop=1.0, time_budget=1, example_inputs=text_inputs(2), output=tmp_path / "r.json")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.npz"]


def test_text_models_refuse_image_shapes_and_lengths_beyond_their_positions(capsys, tmp_path):
    """Items 16, 17: --seq-len 100 with 64 positions was a torch.export failure; 3,224,224 was taken as length 3."""
    import tpc
    from families import hf_bert, text_inputs

    with pytest.raises(TpcError, match=r"at most 64 tokens \(max_position_embeddings\)"):
        tpc.compile(hf_bert(), text_inputs(2), layers=[0], seq_len=100)
    hf_bert().save_pretrained(tmp_path / "bert")
    out = tmp_path / "b.onnx"
    assert_refused(capsys, ["compile", tmp_path / "bert", "--input-size", "3,224,224", "--layers", "0", "-o", out],
                   "text model", "not images")
    assert_refused(capsys, ["compile", tmp_path / "bert", "--input-size", "100", "--layers", "0", "-o", out],
                   "at most 64 tokens")
    assert not out.exists()


def test_weights_that_do_not_fit_the_config_are_refused_not_drawn_at_random(capsys, tmp_path):
    """Item 22: a BERT config with DistilBERT weights loaded as a random model, exit 0."""
    from transformers import DistilBertConfig, DistilBertModel

    from families import hf_bert

    hf_bert().save_pretrained(tmp_path / "bert")
    DistilBertModel(DistilBertConfig(vocab_size=120, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(
        tmp_path / "distil")
    (tmp_path / "distil" / "model.safetensors").replace(tmp_path / "bert" / "model.safetensors")
    out = tmp_path / "b.onnx"
    assert_refused(capsys, ["compile", tmp_path / "bert", "--layers", "0", "-o", out], "do not fit BertModel",
                   "missing (e.g. ")
    assert not out.exists()


@pytest.mark.slow
def test_weights_of_another_kind_or_nan_say_so(capsys, tmp_path):
    """Item 23: int64 copies of float weights were cast silently; item 24: NaN weights gave 'differ by nan'."""
    from safetensors.torch import save_file

    from models import tiny_timm_vit

    state = tiny_timm_vit().state_dict()
    save_file({k: v.to(torch.int64) if k == "head.weight" else v for k, v in state.items()}, tmp_path / "int.safetensors")
    state["head.bias"][0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    model = ["vit_tiny_patch16_224", "--model-args",
             "img_size=32,patch_size=8,embed_dim=32,depth=4,num_heads=2,mlp_ratio=2.0,num_classes=5"]  # tiny_timm_vit
    out = tmp_path / "m.onnx"
    assert_refused(capsys, ["inspect", *model, "--weights", tmp_path / "int.safetensors"],
                   "head.weight int64 in the file, float32 in the model")
    assert_refused(capsys, ["compile", *model, "--weights", tmp_path / "nan.safetensors", "--layers", "1", "-o", out],
                   "outputs are NaN")
    assert not out.exists()


@pytest.mark.slow
def test_tune_says_time_ran_out_refuses_infinite_budgets_and_nan_images(capsys, bad_files, tmp_path):
    """Items 18, 19, 20: 'no recipe met the budget' after no recipe was tried; NaN images as 'not float32 in
    [nan, nan]'; --max-drop inf wrote Infinity into recipe.json."""
    import numpy as np

    images = np.load(bad_files / "f01.npz")["images"].copy()
    images[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    tune = ["tune", TINY, "--mean", "0.5", "--std", "0.5", "-o", tmp_path / "r.json"]
    assert_refused(capsys, [*tune, "--data", tmp_path / "nan.npz", "--max-drop", "1"], "images hold 1 NaN values")
    assert_refused(capsys, [*tune, "--data", bad_files / "u8.npz", "--max-drop", "inf"], "--max-drop inf", "finite")
    from tpc.cli import main

    capsys.readouterr()
    assert main([str(a) for a in (*tune, "--data", bad_files / "u8.npz", "--max-drop", "1", "--time", "0.001s")]) == 1
    assert "the time budget ran out before any recipe was scored" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npz"]


def test_a_model_id_without_layers_is_told_so_before_it_loads(capsys, tmp_path):
    """'Also': the model was loaded (here: pretrained weights the hub cannot give) before 'pass --layers'."""
    assert_refused(capsys, ["compile", "vit_tiny_patch16_224", "-o", tmp_path / "m.onnx"], "pass --layers")


@pytest.mark.slow
def test_an_integer_keep_under_5_percent_of_the_tokens_is_said(caplog):
    """'Also': --keep 1 (one token) is easily meant as --keep 1.0 (all)."""
    import tpc

    from models import image_inputs, tiny_timm_vit

    model, inputs = tiny_timm_vit(patch_size=4, depth=2), image_inputs(2)  # 64 patch tokens after [CLS]
    for keep, warned in ((1, True), (1.0, False), (4, False)):
        caplog.clear()
        tpc.compile(model, inputs, layers=[1], keep=keep)
        assert ("layer 1 keeps 1 of its 64 tokens" in caplog.text) == warned, (keep, caplog.text)
def test_the_pt2_serialization_id_is_the_same_whatever_id_torch_drew():
    """torch.export.save's serialization_id may differ between processes: the id tpc writes instead
    is a digest of the rest of the archive, which once still held the drawn id's CRC-32."""
    import torch

    from tpc.pt2 import SERIALIZATION_ID, _fixed_serialization_id, replace_member

    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    drawn = io.BytesIO()
    torch.export.save(torch.export.export(AddOne(), (torch.ones(2),)), drawn)
    drawn = drawn.getvalue()
    with zipfile.ZipFile(io.BytesIO(drawn)) as archive:
        size = next(i.file_size for i in archive.infolist() if i.filename.endswith(SERIALIZATION_ID))
    other = replace_member(drawn, SERIALIZATION_ID, b"7" * size)  # what another process may have drawn
    with zipfile.ZipFile(io.BytesIO(other)) as archive:  # a valid archive (CRCs checked on read)
        assert archive.read(next(n for n in archive.namelist() if n.endswith(SERIALIZATION_ID))) == b"7" * size
        assert archive.testzip() is None
    assert other != drawn
    assert _fixed_serialization_id(other) == _fixed_serialization_id(drawn)


@pytest.mark.parametrize("architectures", [[{}], "LlavaForConditionalGeneration", {"a": 1}])
def test_a_config_json_with_odd_architectures_gets_one_line(cli, tmp_path, architectures):
    """compile without --layers reads config.json to know whether a VLM is meant: an architectures
    entry that is not a class name (a dict raised TypeError: unhashable) is the load's to refuse."""
    model = tmp_path / "odd"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": architectures}))
    result = cli("compile", model, "-o", tmp_path / "m.onnx")
    assert result.returncode == 1 and result.stderr.startswith("tpc: error:"), result.stderr
    assert not (tmp_path / "m.onnx").exists()
