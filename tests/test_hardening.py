"""Hostile and mistaken input: no code runs from a model file, every bad input gets one line,
artifacts are written as users expect (issue 10)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import tpc
from tpc.errors import TpcError

TESTS = Path(__file__).parent


def run_tpc(*args, cwd=TESTS, **kwargs):
    return subprocess.run([sys.executable, "-m", "tpc", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("tpc: error: "), (r.returncode, r.stderr)
    return lines[0]


class CreatesMarker:
    """Unpickling this object opens (creates) ``marker``: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pt2(tmp_path: Path, marker: Path, where: str) -> Path:
    """A valid .pt2 whose first weight (``where="weight"``) or sample inputs (``"inputs"``) is a
    pickle that creates ``marker`` when unpickled."""
    good, bad = tmp_path / "good.pt2", tmp_path / f"evil_{where}.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),)), str(good))
    payload = io.BytesIO()
    torch.save(CreatesMarker(marker), payload)
    with zipfile.ZipFile(good) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    config_name = next(i.filename for i, _ in members if i.filename.endswith("model_weights_config.json"))
    config = json.loads(dict((i.filename, d) for i, d in members)[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    with zipfile.ZipFile(bad, "w") as zout:
        for info, data in members:
            if where == "weight" and info.filename == config_name:
                data = json.dumps(config).encode()
            if (where == "weight" and info.filename.endswith("/" + first["path_name"])) or (
                    where == "inputs" and "/sample_inputs/" in info.filename):
                data = payload.getvalue()
            zout.writestr(info, data)
    good.unlink()
    return bad


@pytest.mark.parametrize("where", ["weight", "inputs"])
def test_a_pt2_never_runs_pickled_code(tmp_path, where):
    marker = tmp_path / "marker"
    evil = malicious_pt2(tmp_path, marker, where)
    with pytest.raises(TpcError, match="refusing to load"):
        tpc.compile(str(evil), layers=[0])
    assert not marker.exists()
    if where == "weight":  # the CLI once, for both paths share the loader
        line = one_error_line(run_tpc("inspect", evil))
        assert "refusing to load" in line and "pickle" in line
        assert not marker.exists()


# --- precision (item 15) ---------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("method", sorted(tpc.passes.METHODS))
def test_every_method_runs_cast_to_half_precision(method):
    """A pruned module cast with .to(fp16/bf16) runs in that dtype and stays near the fp32 output."""
    from models import TEST_MODELS

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method=method, layers=[1], keep=0.5)
    x = inputs(2)
    ref = pm(*x)
    for dtype in HALF:
        out = pm.to(dtype)(*(t.to(dtype) for t in x))
        assert out.dtype == dtype and torch.isfinite(out).all()
        if dtype == torch.float16:  # bf16's 8 bits may legitimately flip a greedy selection
            assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
        pm.to(torch.float32)


def test_tome_compiles_in_half_precision_and_fp16_onnx_is_checked_with_fp16_tolerances(tmp_path):
    from models import TEST_MODELS

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    ref = tpc.compile(factory(), inputs(2), method="tome", layers=[1], r=4)(*inputs(2))
    for dtype in HALF:
        x = tuple(t.to(dtype) for t in inputs(2))
        pm = tpc.compile(factory().to(dtype), x, method="tome", layers=[1], r=4)
        out = pm(*x)
        assert out.dtype == dtype
        assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
        if dtype == torch.float16:
            result = tpc.export(pm, tmp_path / "tome16.onnx")
            assert result.max_abs_error > 1e-4  # fp32's tolerance would have refused it
    assert [p.name for p in tmp_path.iterdir()] == ["tome16.onnx"]


def test_bf16_onnx_check_says_onnx_runtime_cannot_run_it(tmp_path):
    from models import TEST_MODELS

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    x = tuple(t.to(torch.bfloat16) for t in inputs(2))
    pm = tpc.compile(factory().to(torch.bfloat16), x, layers=[1], keep=0.5)
    with pytest.raises(TpcError, match="cannot run this bfloat16 model.*--no-check"):
        tpc.export(pm, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
