"""The command line end to end, through `python -m tpc` (a subprocess) and, where a case needs no
fresh Python, through tpc.cli.main in the test process (the cli fixture); and its one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

TESTS = Path(__file__).parent


def tpc(*args, cwd=TESTS):
    return subprocess.run([sys.executable, "-m", "tpc", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_compile_writes_a_checked_onnx_file(tmp_path):
    out = tmp_path / "tiny.onnx"
    r = tpc("compile", "models:cli_tiny_vit", "--pass", "topk-cls", "--layers", "1,2", "--keep", "0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "17 -> 9" in r.stdout and "checked against the torch module at batch 1 and 2" in r.stdout
    assert onnx.load(out).graph.node


def test_python_m_tpc_runs_the_cli():
    r = tpc("passes")
    assert r.returncode == 0 and "topk-cls" in r.stdout and not r.stderr


def test_every_command_is_a_module_with_run():
    """cli.py's COMMANDS names a module with ``run(args)`` for each subcommand the parser knows."""
    import importlib

    from tpc.cli import COMMANDS, build_parser

    assert set(COMMANDS) == set(build_parser()._subparsers._group_actions[0].choices)
    assert all(callable(importlib.import_module(module).run) for module in COMMANDS.values())


@pytest.mark.slow  # a fresh Python, to see what it imported
def test_an_argument_error_imports_no_command():
    """The command's module, and what it imports, waits until the arguments parse (as for --help)."""
    code = ("import sys\nfrom tpc.cli import main\ntry:\n    main(['compile', 'm'])\nexcept SystemExit as e:\n"
            "    print(e.code, sorted(m for m in sys.modules if m.startswith('tpc.commands.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, timeout=600)
    assert r.stdout.split() == ["2", "[]"], r.stdout + r.stderr
    assert "the following arguments are required: -o/--output" in r.stderr


def test_compile_pt2_and_inspect_it(cli, tmp_path):
    out = tmp_path / "tiny.pt2"
    assert cli("compile", "models:cli_tiny_vit", "--pass", "random", "--layers", "0", "--keep", "4", "-o", out).returncode == 0
    r = cli("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "4 attention layers" in r.stdout


@pytest.mark.slow
def test_deit_small_end_to_end(tmp_path, cli):
    out = tmp_path / "deit_pruned.onnx"
    r = cli("compile", "deit_small_patch16_224", "--random-weights", "--pass", "topk-cls", "--layers", "3,6,9",
            "--keep", "0.7", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "197 -> 139" in r.stdout and "98 -> 69" in r.stdout
    assert re.search(r"wrote \S+ in [\d.]+ s:", r.stdout)  # the time is reported; its budget is a benchmark, not a test
    assert "34.8% fewer" in r.stdout  # the report compile prints is inspect's (tests/test_cli.py's tiny models run inspect)


@pytest.mark.slow
def test_inspect_tome_merges_every_layer_with_tome_s_schedule(cli):
    r = cli("inspect", "models:cli_tiny_vit", "--pass", "tome", "--r", "(4,-1)")
    assert r.returncode == 0, r.stderr
    assert "tome r=8,5,2,0 after layers 0-3" in r.stdout, r.stdout  # ToMe's parse_r(4, (4, -1))
    assert "tome: 17 -> 9" in r.stdout and "(r 5 clamped to 4)" in r.stdout, r.stdout


def test_passes_lists_methods_with_papers(cli):
    r = cli("passes")
    assert r.returncode == 0 and "topk-cls" in r.stdout and "EViT" in r.stdout and "random" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["no_such_model_xyz", "--layers", "1"], "unknown model id"),
    (["models:cli_tiny_vit", "--layers", "4"], "out of range"),
    (["models:cli_tiny_vit", "--layers", "1", "--keep", "0"], "not positive"),
    (["models:cli_tiny_vit", "--layers", "1", "--keep", "0.0"], "outside (0, 1]"),
    (["models:cli_tiny_vit", "--layers", "1", "--keep", "1.5"], "outside (0, 1]"),
    (["models:cli_tiny_vit", "--layers", "1", "--keep", "-3"], "not positive"),
    (["models:cli_tiny_vit", "--layers", "1", "--pass", "nope"], "unknown pruning method"),
    (["models:cli_tiny_vit", "--keep", "0.5"], "no pruning layers given: pass --layers"),
    (["models:cli_tiny_vit", "--pass", "tome", "--r", "(16)"], "--r takes 16"),
    (["resnet18", "--random-weights", "--layers", "1"], "no attention layers"),
    (["deit_tiny_patch16_224", "--layers", "1"], "--random-weights"),
])
def test_bad_input_gives_one_line_and_writes_nothing(cli, tmp_path, args, words):
    out = tmp_path / "out.onnx"
    r = cli("compile", *args, "-o", out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: ") and words in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directory(cli, tmp_path):
    r = cli("compile", "models:cli_tiny_vit", "--layers", "1", "-o", tmp_path / "nope" / "m.onnx")
    assert r.returncode != 0 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_existing_output_is_not_clobbered_on_failure(cli, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    r = cli("compile", "models:cli_tiny_vit", "--layers", "9", "-o", out)
    assert r.returncode != 0 and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_output_onto_the_model_file_is_refused_before_any_work(tmp_path, capsys):
    from tpc.cli import main

    model = tmp_path / "model.pt2"
    model.write_bytes(b"the user's exported model")
    link = tmp_path / "same.pt2"
    link.symlink_to(model)
    for out in (model, link):
        assert main(["compile", str(model), "--pass", "random", "--layers", "0", "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert "is the model you compile" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == b"the user's exported model"


def test_plan_without_tensorrt_or_gpu_names_what_is_missing(cli, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: nothing is missing")
    r = cli("compile", "models:cli_tiny_vit", "--layers", "1", "-o", tmp_path / "engine.plan")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and ("TensorRT is not installed" in lines[0] or "no CUDA GPU" in lines[0])
    assert "pip install" in lines[0] or "GPU" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_output_whose_reader_went_away_or_a_full_disk_is_no_internal_error(monkeypatch, capsys):
    """`tpc passes | head -1` and `tpc passes > /dev/full` said "internal error ... a bug in tpc"."""
    import os

    from tpc.cli import main

    read, write = os.pipe()
    os.close(read)
    with open(write, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["passes"]) == 141
    assert capsys.readouterr().err == ""
    with open("/dev/full", "w", buffering=1) as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["passes"]) == 1
    assert capsys.readouterr().err == "tpc: error: No space left on device; free some space and rerun\n"


@pytest.mark.parametrize("args, words", [
    (["--option", "page=4", "--option", "page=8"], "--option page is given twice (4, then 8): give it once"),
    (["--option", "page=4,page=8"], "page is given twice in 'page=4,page=8': give it once"),
    (["--model-args", "depth=2,depth=3"], "depth is given twice in 'depth=2,depth=3': give it once"),
])
def test_a_setting_given_twice_is_refused_not_overridden(tmp_path, capsys, args, words):
    """`--option page=4 --option page=8` compiled with page 8 without a word."""
    from tpc.cli import main

    out = tmp_path / "dec.pt2"
    assert main(["compile", str(tmp_path / "never-loaded"), "--pass", "quest", *args, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()



@pytest.mark.parametrize("argv, said", [
    (["passes", "--keep", "3"], "tpc passes: error: unrecognized arguments: --keep 3"),
    (["compile", "m", "-o", "m.pt2", "--context", "64"], "tpc compile: error: unrecognized arguments: --context 64"),
    (["--bogus", "passes"], "tpc: error: unrecognized arguments: --bogus"),
])
def test_a_flag_of_another_command_is_reported_by_the_command(capsys, argv, said):
    """`tpc compile … --context 64` said 'tpc: error:' under tpc's usage, while a missing argument is
    reported as 'tpc compile: error:' under compile's."""
    from tpc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    prog = said.split(": error:")[0]  # the parser that spoke: its usage comes first
    assert said in err and err.startswith(f"usage: {prog} "), err
