"""Hostile and mistaken input, third round (issue 22): no model directory's code runs, no input is
overwritten, reproducible ``.pt2`` files, and one line for every bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_hardening import TESTS, TINY, assert_refused

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


def test_the_same_compile_in_two_processes_writes_the_same_pt2_bytes(tmp_path, monkeypatch):
    """Node provenance once held memory addresses and the archive a random id: now same input, same bytes."""
    from tpc.cli import main

    args = ["compile", TINY, "--layers", "1", "--keep", "0.5", "--no-check", "-o"]
    other = subprocess.Popen([sys.executable, "-m", "tpc", *args, str(tmp_path / "a.pt2")], cwd=TESTS,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monkeypatch.chdir(TESTS)
    assert main([*args, str(tmp_path / "b.pt2")]) == 0
    assert other.wait(timeout=600) == 0, other.stderr.read()
    assert (tmp_path / "a.pt2").read_bytes() == (tmp_path / "b.pt2").read_bytes()
