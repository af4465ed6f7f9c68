"""tpc bench, tpc eval and tpc visualize end to end on the tiny seeded ViT, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpc import TpcError
from tpc.commands.bench import run_bench
from tpc.commands.eval import run_eval
from tpc.visualize import GREY, LABEL_HEIGHT, run_visualize

TESTS = Path(__file__).parent
MODEL = "models:cli_tiny_vit"


@pytest.fixture(autouse=True)
def _in_tests_dir(monkeypatch):
    monkeypatch.chdir(TESTS)


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 5, 64))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bench_measures_both_models_side_by_side(backend):
    result = run_bench(MODEL, layers="1,2", keep="0.5", backend=backend, batches="1,2", warmup=1, iters=2, repeats=2)
    assert [r.batch for r in result.rows] == [1, 2]
    for r in result.rows:
        assert r.timing.base.median_ms > 0 and r.timing.pruned.median_ms > 0
        lo, hi = r.timing.speedup_spread
        assert lo <= hi and r.flops_speedup > 1.0
        assert 0.0 < r.inserted_share < 1.0
        assert r.of_limit == pytest.approx(r.timing.speedup / r.flops_speedup)
    assert "of limit" in result.table()


def test_the_speedup_lies_within_its_spread():
    """Samples where the pooled medians' ratio (2.0) is above every repeat's (1.67, 1.5, 1.33)."""
    from tpc.timing import pair_timing

    t = pair_timing([[5, 5, 5], [3, 4, 1], [5, 4, 3]], [[5, 2, 3], [2, 2, 2], [1, 5, 3]], batch=1)
    assert t.speedup_spread == pytest.approx((4 / 3, 5 / 3)) and t.speedup == pytest.approx(1.5)
    assert t.base.median_ms == 4000 and t.pruned.median_ms == 2000 and (t.repeats, t.iters) == (3, 3)


@pytest.mark.slow
def test_bench_cli_json(cli):
    r = cli("bench", MODEL, "--layers", "1", "--keep", "0.5", "--batch", "2", "--iters", "2", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["rows"][0]["batch"] == 2 and "of_limit" in data["rows"][0]


def test_bench_threads_0_is_refused_in_one_line(cli):
    r = cli("bench", MODEL, "--layers", "1", "--threads", "0")  # once taken silently as "all cores"
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--threads 0" in r.stderr


@pytest.mark.slow
def test_eval_sweep_table_and_plot(npz, tmp_path):
    plot = tmp_path / "sweep.png"
    result = run_eval(MODEL, data=npz, method="topk-cls", layers="1,2", sweep=["0.9", "0.5"], mean="0.5,0.5,0.5",
                      std="0.5,0.5,0.5", plot=plot)
    assert [r.config.split(" after")[0] for r in result.rows] == ["unpruned", "topk-cls keep 0.9", "topk-cls keep 0.5"]
    assert result.rows[0].agreement == 1.0 and result.images == 64
    assert result.rows[2].flops_ratio < result.rows[1].flops_ratio < 1.0
    assert all(0.0 <= r.top1 <= 1.0 for r in result.rows)
    assert Image.open(plot).format == "PNG"


@pytest.mark.slow
def test_eval_cli_onnxruntime_json(cli, npz):
    r = cli("eval", MODEL, "--data", npz, "--layers", "1", "--keep", "0.5", "--mean", "0.5,0.5,0.5", "--std",
            "0.5,0.5,0.5", "--backend", "onnxruntime", "--limit", "16", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert len(rows) == 2 and json.loads(r.stdout)["images"] == 16


@pytest.mark.slow
def test_visualize_greys_the_dropped_patches(tmp_path):
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "kept.png"
    result = run_visualize(MODEL, image, out, layers="1,2", keep="0.5", mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    assert result.grid == (4, 4) and result.kept == [8, 4]
    png = np.asarray(Image.open(out).convert("RGB"))
    factor = -(-224 // 32)
    side = 32 * factor
    assert png.shape == (side + LABEL_HEIGHT, 3 * side, 3)
    cell = 8 * factor
    for panel, kept in enumerate([16, 8, 4]):
        grey = 0
        for r in range(4):
            for c in range(4):
                patch = png[LABEL_HEIGHT + r * cell: LABEL_HEIGHT + (r + 1) * cell, panel * side + c * cell: panel * side + (c + 1) * cell]
                grey += bool((patch == np.array(GREY)).all())
        assert grey == 16 - kept


@pytest.mark.parametrize("args, words", [
    (["eval", MODEL, "--data", "missing.npz", "--layers", "1"], "does not exist"),
    (["eval", MODEL, "--data", "{noimages}", "--layers", "1", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"], "no 'images'"),
    (["eval", MODEL, "--data", "{wrongsize}", "--layers", "1", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"], "the model takes"),
    (["visualize", MODEL, "{small}", "--layers", "1", "-o", "{out}"], "at least that large"),
    (["bench", MODEL, "--layers", "1", "--backend", "tpu"], "unknown backend"),
    (["bench", MODEL, "--layers", "1", "--backend", "tensorrt"], "TensorRT is not installed"),
    (["eval", MODEL, "--data", "{wrongsize}", "--layers", "1", "--backend", "tpu"], "unknown backend"),
])
def test_bad_input_one_line(cli, tmp_path, args, words):
    np.savez(tmp_path / "noimages.npz", labels=np.zeros(3))
    np.savez(tmp_path / "wrongsize.npz", images=np.zeros((3, 16, 16, 3), dtype=np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    paths = {"noimages": tmp_path / "noimages.npz", "wrongsize": tmp_path / "wrongsize.npz",
             "small": tmp_path / "small.png", "out": tmp_path / "out.png"}
    r = cli(*[a.format(**paths) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "out.png").exists()


def test_run_eval_rejects_unknown_backend(npz):
    with pytest.raises(TpcError, match="unknown backend"):
        run_eval(MODEL, data=npz, layers="1", backend="tpu")


def test_each_command_names_the_backends_it_runs(npz):
    """One list of backends: a known backend a command does not run is named as such, with what it runs."""
    import tpc

    with pytest.raises(TpcError, match=r"^backend 'tensorrt': tpc eval runs torch, onnxruntime \(a TensorRT engine: "):
        run_eval(MODEL, data=npz, layers="1", backend="tensorrt")
    with pytest.raises(TpcError, match=r"^backend 'tensorrt': tpc.compile runs torch, onnxruntime"):
        tpc.compile(MODEL, layers=[1], backend="tensorrt")
    with pytest.raises(TpcError, match=r"^unknown backend 'tpu': tpc bench runs torch, onnxruntime, tensorrt$"):
        run_bench(MODEL, layers="1", backend="tpu")


def test_eval_reads_an_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    result = run_eval(MODEL, data=tmp_path / "data", layers="1", keep="0.5", mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    assert result.images == 6 and all(r.top1 is not None for r in result.rows)


def test_eval_warns_when_the_labels_are_classes_the_model_lacks(tmp_path, caplog):
    """ImageNet-numbered labels on a 5-class head used to print 0.00% top-1 without a word."""
    path = tmp_path / "imagenet_labels.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), dtype=np.uint8), labels=np.array([990, 991]))
    with caplog.at_level("WARNING", logger="tpc.dataset"):
        result = run_eval(MODEL, data=path, mean="0.5", std="0.5")
    assert result.rows[0].top1 == 0.0
    assert [r.getMessage() for r in caplog.records if "run from 990 to 991" in r.getMessage()], caplog.text
