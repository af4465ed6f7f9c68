"""The method registry: capabilities are what the CLI lists and what the tests, the tune search
space and the refusals read; a method registered as a new one is tested where it applies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpc.cli import main
from tpc.errors import TpcError
from tpc.registry import METHODS, Kind, PruneMethod, Where, get_method, register
from tpc.tune.space import candidates, searched_by_default

TESTS = Path(__file__).parent


def test_tpc_passes_lists_every_method_with_where_it_applies(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for m in METHODS.values():
        assert m.name in out and m.capabilities() in out
    assert "fastv" in out and "visual tokens inside the LM" in out
    assert get_method("tome").capabilities() == "merge; encoder tokens; needs a fixed length; no attention mask"


def test_a_method_is_refused_where_it_does_not_apply_in_one_line():
    with pytest.raises(TpcError, match=r"^fastv does not prune encoder tokens: it prunes visual tokens inside the "
                                       r"LM; for encoder tokens use topk-cls, .*, random$"):
        get_method("fastv", Where.ENCODER)
    with pytest.raises(TpcError, match="unknown pruning method 'nope'"):
        get_method("nope")
    with pytest.raises(TpcError, match="already registered"):
        register(METHODS["random"])
    with pytest.raises(TpcError, match="applies nowhere"):
        register(PruneMethod("nowhere", "", "", Kind.SELECT, "random", {}))


def test_tune_searches_what_the_capabilities_say():
    """Baselines are never searched; a merging method gets ToMe's families; fastv is no encoder method."""
    assert searched_by_default() == ["topk-cls", "topk-mass", "zero-tprune", "kcenter", "divprune", "tome"]
    grid = candidates(4, 17, 1, ["tome", "topk-mass"])
    assert {s.method for steps in grid for s in steps} == {"tome", "topk-mass"}
    assert any({s.method for s in steps} == {"tome", "topk-mass"} for steps in grid)  # the mixed family
    with pytest.raises(TpcError, match="fastv does not prune encoder tokens"):
        candidates(4, 17, 1, ["fastv"])


@pytest.mark.slow
def test_a_new_method_is_tested_wherever_its_capabilities_say(tmp_path):
    """A toy method (tests/toy_method.py: an encoder and a before-the-language-model implementation,
    registered as a new method would be) is collected by every test that runs each encoder method
    and each visual method before the language model, not by the tests of places it does not
    prune; and the generic tests it is collected by pass for it. One pytest run collects the five
    files (tests/record_collected.py writes what it collected) and runs three of the toy's tests."""
    files = ["tests/test_pipeline.py", "tests/test_golden.py", "tests/test_onnx.py", "tests/test_families.py",
             "tests/test_vlm_llava.py"]
    ran_tests = ["test_keep_one_reproduces_the_original and timm_vit",
                 "test_bert_padding_never_outranks_real_tokens_and_mask_is_gathered",
                 "test_every_method_before_the_language_model_runs_it_on_the_tokens_it_keeps"]
    env = {**os.environ, "TPC_TOY_METHOD": "1", "TPC_COLLECTED": str(tmp_path / "collected.txt"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path])}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-p",
                          "record_collected", "-q", "-k", f"toy-norm and ({' or '.join(f'({t})' for t in ran_tests)})", *files],
                         cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0 and " passed" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert "3 passed" in ran.stdout, ran.stdout[-500:]  # a ViT, BERT, LLaVA
    toy = {line.split("[")[0] for line in (tmp_path / "collected.txt").read_text().splitlines() if "toy-norm" in line}
    for test in ("test_pipeline.py::test_keep_one_reproduces_the_original",
                 "test_pipeline.py::test_pruned_matches_eager_reference",
                 "test_golden.py::test_golden_graph_and_outputs", "test_onnx.py::test_onnx_runtime_parity_at_batch_1_and_5",
                 "test_families.py::test_bert_padding_never_outranks_real_tokens_and_mask_is_gathered",
                 "test_vlm_llava.py::test_every_method_before_the_language_model_runs_it_on_the_tokens_it_keeps"):
        assert f"tests/{test}" in toy, (test, sorted(toy))
    assert not any("inside_the_language_model" in t for t in toy)  # the toy does not prune there
