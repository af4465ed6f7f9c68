"""Model ids: timm names, .pt2 programs, module:function, weight files (loaded safely)."""

from __future__ import annotations

import pickle

import pytest
import torch

import tpc
from models import tiny_timm_vit
from tpc.models import load


def test_timm_random_weights_with_model_args():
    m = load("vit_tiny_patch16_224", random_weights=True, model_args="img_size=32,patch_size=8,depth=2,num_classes=3")
    assert m.example_inputs[0].shape == (2, 3, 32, 32)
    assert m.module(*m.example_inputs).shape == (2, 3)
    assert load("timm/vit_tiny_patch16_224", random_weights=True, model_args={"img_size": 32, "patch_size": 8}).name


def test_weights_file_round_trip(tmp_path):
    src = tiny_timm_vit(seed=3)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    args = "img_size=32,patch_size=8,embed_dim=32,depth=4,num_heads=2,mlp_ratio=2.0,num_classes=5"
    m = load("vit_tiny_patch16_224", weights=tmp_path / "w.pth", model_args=args)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.module.eval()(x), src(x))


def test_weights_that_do_not_fit(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(tpc.TpcError, match="do not fit the model"):
        load("vit_tiny_patch16_224", weights=tmp_path / "w.pth", model_args="img_size=32,patch_size=8")


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_code_in_a_weights_file_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("w.pth", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(tpc.TpcError, match="never unpickles"):
        load("vit_tiny_patch16_224", weights="w.pth")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_pt2_and_function_ids(tmp_path):
    model = tiny_timm_vit()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = load(str(tmp_path / "m.pt2"))
    assert loaded.example_inputs[0].shape[1:] == (3, 32, 32)
    pm = tpc.compile(str(tmp_path / "m.pt2"), layers=[1], keep=0.5)
    assert pm(x).shape == (2, 5)
    assert load("models:cli_tiny_vit").module is not None


def test_missing_files_and_bad_functions(tmp_path):
    with pytest.raises(tpc.TpcError, match="does not exist"):
        load(str(tmp_path / "nope.pt2"))
    with pytest.raises(tpc.TpcError, match="cannot import"):
        load("no_such_module_xyz:fn")
    with pytest.raises(tpc.TpcError, match="does not exist"):
        load("vit_tiny_patch16_224", weights=tmp_path / "nope.pth")


def test_a_hugging_face_config_that_does_not_load_says_why(tmp_path):
    """A directory with a config.json transformers cannot read is not 'no such model': the line says why."""
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": ')  # cut short
    with pytest.raises(tpc.TpcError, match=r"its config.json does not load \(\w+: .+\); fix it, or save the model again"):
        load(str(tmp_path))
