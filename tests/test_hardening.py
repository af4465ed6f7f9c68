"""Hostile and mistaken input: no code runs from a model file, every bad input gets one line,
artifacts are written as users expect (issue 10)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import tpc
from specs import ENCODER_METHODS
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_pt2_with_a_fixed_batch_or_already_pruned_is_refused_with_what_to_do(tmp_path):
    from models import image_inputs, tiny_timm_vit

    model = tiny_timm_vit(depth=2)
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, image_inputs(2)), fixed)  # torch.export's default: batch 2 only
    with pytest.raises(TpcError, match="fixed batch of 2.*Dim.DYNAMIC") as err:
        tpc.compile(str(fixed), method="topk-cls", layers=[1])
    assert "\n" not in str(err.value)
    pruned = tmp_path / "pruned.pt2"
    tpc.export(tpc.compile(model, image_inputs(2), method="topk-cls", layers=[1], keep=0.5), pruned)
    with pytest.raises(TpcError, match="already pruned by tpc"):
        tpc.compile(str(pruned), method="topk-cls", layers=[0])


# --- precision (item 15) ---------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ENCODER_METHODS))
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bf16_onnx_check_says_onnx_runtime_cannot_run_it(tmp_path):
    from models import TEST_MODELS

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    x = tuple(t.to(torch.bfloat16) for t in inputs(2))
    pm = tpc.compile(factory().to(torch.bfloat16), x, layers=[1], keep=0.5)
    with pytest.raises(TpcError, match="cannot run this bfloat16 model.*--no-check"):
        tpc.export(pm, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# --- one line for every bad input (items 2, 7, 9, 10, 11, 14), through the CLI's main in-process ---

TINY = "models:cli_tiny_vit"
TIMM_TINY = ["vit_tiny_patch16_224", "--model-args", "img_size=32,depth=1"]


def cli(capsys, *args) -> tuple[int, list[str]]:
    from tpc.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_refused(capsys, args, *words):
    rc, lines = cli(capsys, *args)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("tpc: error: "), (rc, lines)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import numpy as np
    import timm

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("hello\n")
    (d / "corrupt.safetensors").write_bytes(b"\xff" * 100)
    torch.save({"weights": CreatesMarker(d / "never")}, d / "pickled.pt")
    state = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict()
    state["head.weight"] = torch.zeros(3, 192)
    torch.save(state, d / "wrong_shape.pt")
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),)), str(d / "linear.pt2"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(d / "u8.npz", images=images, labels=np.arange(6) % 5)
    np.savez(d / "f01.npz", images=images.astype(np.float32) / 255, labels=np.arange(6) % 5)
    np.savez(d / "f255.npz", images=images.astype(np.float32), labels=np.arange(6) % 5)
    np.savez(d / "str_labels.npz", images=images, labels=np.array(["cat"] * 6))
    np.savez(d / "objects.npz", images=np.array([None, 1], dtype=object))
    np.savez(d / "column_labels.npz", images=images, labels=(np.arange(6) % 5)[:, None])
    np.savez(d / "scalar_label.npz", images=images, labels=np.int64(3))
    (d / "folder" / "cat").mkdir(parents=True)
    (d / "folder" / "cat" / "broken.png").write_bytes(b"not a png")
    np.savez(d / "empty.npz", images=images[:0])
    (d / "empty_dir").mkdir()
    (d / "user_models.py").write_text("def broken():\n    return 1 / 0\n")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    return d


def test_bad_inputs_get_one_line_naming_the_mistake(capsys, bad_files, tmp_path, monkeypatch):
    d, out = bad_files, tmp_path / "m.onnx"
    cases = [
        # item 2: flags a .pt2 cannot honour
        (["compile", d / "linear.pt2", "--layers", "0", "--weights", d / "u8.npz", "-o", out], "--weights cannot apply"),
        (["compile", d / "linear.pt2", "--layers", "0", "--model-args", "a=1", "-o", out], "--model-args cannot apply"),
        # item 9: weight files
        (["compile", *TIMM_TINY, "--weights", d / "wrong_shape.pt", "--layers", "0", "-o", out],
         "head.weight [3, 192] in the file, [1000, 192] in the model"),
        (["compile", *TIMM_TINY, "--weights", d / "corrupt.safetensors", "--layers", "0", "-o", out], "is corrupt"),
        # item 10: the user's mistakes, not tpc's
        (["compile", ":", "--layers", "0", "-o", out], "not a model id"),
        (["compile", "user_models:broken", "--layers", "0", "-o", out], "ZeroDivisionError", "user_models.py:2"),
        (["eval", TINY, "--data", d / "u8.npz", "--mean", "0.5,0.5", "--std", "0.5"], "--mean has 2 values", "3 channels"),
        (["eval", TINY, "--data", d / "str_labels.npz", "--mean", "0.5", "--std", "0.5"], "labels must be integer"),
        (["eval", TINY, "--data", d / "objects.npz", "--mean", "0.5", "--std", "0.5"], "array of Python objects"),
        (["eval", TINY, "--data", d / "column_labels.npz", "--mean", "0.5", "--std", "0.5"], "shape (6,), not (6, 1)"),
        (["eval", TINY, "--data", d / "scalar_label.npz", "--mean", "0.5", "--std", "0.5"], "shape (6,), not ()"),
        (["eval", TINY, "--data", d / "folder", "--mean", "0.5", "--std", "0.5"], "broken.png", "not a readable image"),
        # item 11: messages that say what happened
        (["compile", TINY, "--layers", "1", "--prefix=-1", "-o", out], "--prefix", "0 or more"),
        (["compile", d / "model.onnx", "--layers", "1", "-o", out], "ONNX file", "PyTorch models"),
        (["compile", TINY, "--layers", "1", "-o", d / "empty_dir"], "is a directory"),
        (["visualize", TINY, d, "--layers", "1", "-o", tmp_path / "v.png"], "is a directory"),
        (["eval", TINY, "--data", d / "notes.txt", "--mean", "0.5", "--std", "0.5"], "not an .npz file"),
        (["compile", *TIMM_TINY, "--weights", d / "notes.txt", "--layers", "0", "-o", out], "neither a torch checkpoint"),
        (["compile", *TIMM_TINY, "--weights", d / "pickled.pt", "--layers", "0", "-o", out], "never unpickles"),
        (["eval", TINY, "--data", d / "u8.npz", "--mean", "0.5", "--std", "0.5", "--plot", tmp_path / "no" / "p.png"],
         "of --plot does not exist"),
        (["eval", TINY, "--data", d / "empty.npz", "--mean", "0.5", "--std", "0.5"], "holds no images"),
        # item 12: float images outside [0, 1]
        (["eval", TINY, "--data", d / "f255.npz", "--mean", "0.5", "--std", "0.5"], "float in [0, 1]"),
        # item 14: conflicting flags
        (["compile", TINY, "--layers", "1", "--r", "4", "--keep", "0.5", "-o", out], "--r and --keep"),
        (["inspect", TINY, "--pass", "nope"], "unknown pruning method 'nope'"),
    ]
    monkeypatch.chdir(d)
    for args, *words in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the pickled --weights once printed one beside the line
            line = assert_refused(capsys, args, *words)
        assert "internal error" not in line and "weights_only=False" not in line and "allow_pickle" not in line
    assert list(tmp_path.iterdir()) == [] and not (d / "never").exists()



# --- files written as users expect (items 3, 4, 5, 7, 8) ---------------------------------------


@pytest.mark.slow
def test_artifacts_follow_umask_keep_modes_write_through_links_and_are_byte_identical(tmp_path):
    import os

    from models import TEST_MODELS

    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), layers=[1], keep=0.5)
    old = os.umask(0o022)
    try:
        tpc.export(pm, tmp_path / "a.pt2", check=False)
        assert (tmp_path / "a.pt2").stat().st_mode & 0o777 == 0o644
        served = tmp_path / "served.pt2"
        served.write_bytes(b"old")
        served.chmod(0o640)
        (tmp_path / "link.pt2").symlink_to(served.name)
        tpc.export(pm, tmp_path / "link.pt2", check=False)
    finally:
        os.umask(old)
    assert (tmp_path / "link.pt2").is_symlink() and served.stat().st_mode & 0o777 == 0o640
    assert served.read_bytes() == (tmp_path / "a.pt2").read_bytes()  # same inputs, same bytes, any file name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt2", "link.pt2", "served.pt2"]


# Runs `tpc compile` with one change: once the temporary file holds the artifact, the process says so
# (a file "ready") and waits, so the test's SIGTERM lands mid-write however loaded the machine is.
_PAUSED_WRITE = """
import pathlib, sys, time
real = pathlib.Path.write_bytes
def write_then_wait(self, data):
    n = real(self, data)
    if self.name.startswith(".m.partial-"):
        (self.parent.parent / "ready").touch()
        time.sleep(300)
    return n
pathlib.Path.write_bytes = write_then_wait
from tpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing(tmp_path):
    import signal
    import time

    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITE, "compile", TINY, "--layers", "1", "--no-check", "-o", str(out)],
                            cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():  # the child waits mid-write: no race with a fast write
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert any(p.name.startswith(".m.partial-") for p in out.parent.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "nothing was written" in err, err
    assert list(out.parent.iterdir()) == []


def test_visualize_refuses_to_overwrite_its_input(capsys, tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    before = image.read_bytes()
    assert_refused(capsys, ["visualize", TINY, image, "--layers", "1", "-o", image], "is the input image")
    assert image.read_bytes() == before


@pytest.fixture
def full_disk(tmp_path):
    """A one-page tmpfs: a real filesystem that fills up (needs root, as the mount does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, full_disk, tmp_path):
    from tpc.exports.atomic import atomic_output

    line = one_error_line(run_tpc("compile", TINY, "--layers", "1", "--no-check", "-o", full_disk / "m.pt2"))
    assert "no space left" in line and str(full_disk) in line and "bytes" in line  # once SIGABRT and a C++ stack
    assert_refused(capsys, ["compile", TINY, "--layers", "1", "--no-check", "-o", full_disk / "m.onnx"],
                   "no space left", "bytes")
    with pytest.raises(TpcError, match="no space left"):  # the disk filling up during the write
        with atomic_output(full_disk / "x.png") as tmp:
            tmp.write_bytes(b"x" * (1 << 20))
    assert list(full_disk.iterdir()) == []


# --- seeds, data, the Python API (items 6, 12, 13) ---------------------------------------------


def test_random_weights_are_seeded_the_same_way_for_timm():
    from tpc.cli import build_parser
    from tpc.models import load

    args = dict(random_weights=True, model_args="img_size=32,depth=1")
    state = torch.random.get_rng_state()
    a, b, c = (load("vit_tiny_patch16_224", **args, weights_seed=s).module.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["compile"].format_help().split())
    assert "the seed --random-weights are drawn with (timm and Hugging Face alike); default 0" in help_text


def test_float_images_in_unit_range_are_taken_as_they_are(bad_files):
    """Float images in [0, 1] reach the model as their uint8 copy does (once divided by 255 again)."""
    from tpc.dataset import batches, load_npz

    u8, f01 = (list(batches(load_npz(bad_files / name), (0.5,), (0.5,), 4)) for name in ("u8.npz", "f01.npz"))
    assert len(u8) == len(f01) == 2
    for (_, a), (_, b) in zip(u8, f01):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_python_api_takes_a_tensor_rejects_misspelt_keywords_and_reads_option_strings():
    x = torch.randn(2, 3, 32, 32)
    pm = tpc.compile("vit_tiny_patch16_224", x, random_weights=True, model_args={"img_size": 32, "depth": 2},
                     method="zero-tprune", layers=[0], options="iterations=3")
    assert pm.report.options["iterations"] == 3 and pm(x).shape == (2, 1000)
    module = torch.nn.Linear(3, 3)
    for target in (module, "vit_tiny_patch16_224"):
        with pytest.raises(TpcError, match="no keyword 'kepp'; did you mean keep="):
            tpc.compile(target, layers=[0], kepp=0.5)
    with pytest.raises(TpcError, match="options is a dict"):
        tpc.compile(module, torch.randn(1, 3), layers=[0], options=3)


@pytest.mark.slow
def test_a_tokenizer_dict_as_example_inputs_is_taken_in_forward_order():
    from families import hf_bert, text_inputs

    model = hf_bert()
    ids, mask = text_inputs(2)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}  # a tokenizer's order
    twin = tpc.compile(model, batch, method="topk-cls", layers=[1], keep=1.0)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids, mask, torch.zeros_like(ids))["last_hidden_state"],
                                   model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)
    with pytest.raises(TpcError, match="not the leading arguments of BertModel.forward") as err:
        tpc.compile(model, {"input_ids": ids, "inputs_embeds": None}, method="topk-cls", layers=[1])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("member", "what"), [("data/aotinductor/model/model.so", "AOTInductor shared library"),
                                              ("data/constants/custom_obj_0", "pickled custom object")])
def test_a_pt2_with_members_only_code_can_load_is_refused_unread(tmp_path, member, what):
    """An archive holding a shared library or a pickled custom object is refused from its file list,
    before torch.export.load could open (dlopen or unpickle) the member."""
    marker, good, bad = tmp_path / "marker", tmp_path / "good.pt2", tmp_path / "evil.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),)), str(good))
    payload = io.BytesIO()
    torch.save(CreatesMarker(marker), payload)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        zout.writestr(f"{root}/{member}", payload.getvalue())
    with pytest.raises(TpcError, match=f"refusing to load .*{what}.*which loading would execute"):
        tpc.compile(str(bad), layers=[0])
    assert not marker.exists()
