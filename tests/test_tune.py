"""`tpc tune`: a recipe found on tiny models, written, read back, and the compiled model
reproduces the metric the recipe records, on the tuning and on the check examples."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

import tpc
from families import MeanPooledEncoder, hf_bert, text_inputs
from models import tiny_timm_vit
from tpc.errors import TpcError
from tpc.recipe import check_steps, load_recipe
from tpc.tune import run_tune
from tpc.tune.metrics import Metric, first_tensor
from tpc.tune.search import FINALISTS, Candidate, Search

MEAN, STD = "0.5,0.5,0.5", "0.25,0.25,0.25"


def tiny_sentence_encoder():
    """For `tpc tune test_tune:tiny_sentence_encoder`: BERT + mask-aware mean pooling, with padding."""
    return MeanPooledEncoder(hf_bert()), text_inputs(2)


def _images(path, n=40, labels=False):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)}
    if labels:
        arrays["labels"] = rng.integers(0, 5, n)
    np.savez(path, **arrays)
    return path


def _score(module, inputs, reference, labels, metric):
    with torch.no_grad():
        out, ref = first_tensor(module(*inputs)), first_tensor(reference(*inputs))
    return float(metric.per_example(out, ref, labels).mean())


def test_recipe_found_written_read_back_and_reproduced(tmp_path):
    """Cosine on the logits: any error in the shared-prefix evaluation would show in the 1e-6 comparison."""
    data = _images(tmp_path / "d.npz")
    out = tmp_path / "recipe.json"
    result = run_tune("models:cli_tiny_vit", data, max_drop=1.0, metric="cosine", time_budget=1, methods="tome,topk-cls",
                      mean=MEAN, std=STD, check_split=0.25, output=out)
    assert result.best is not None and out.is_file()
    saved = json.loads(out.read_text())
    assert saved["model"] == "models:cli_tiny_vit" and saved["tpc_version"] == tpc.__version__
    assert saved["metric"]["name"] == "cosine" and saved["data"]["tuning"] == [0, 30] and saved["data"]["check"] == [30, 40]
    assert saved["search"]["tried"] >= 1 and 0 < saved["search"]["search_s"] <= saved["search"]["wall_s"]
    assert saved["search"]["prefix_runs"] >= 1
    ladder = saved["ladder"]  # the fixed-sequence test, most FLOPs first; the pick is its last certified rung
    assert saved["search"]["rule"] == "fixed-sequence" and len(ladder) == saved["search"]["compared"] >= 1
    assert [r["flops_ratio"] for r in ladder] == sorted((r["flops_ratio"] for r in ladder), reverse=True)
    certified = [r for r in ladder if r["certified"]]
    assert certified and certified[-1]["steps"] == saved["steps"] and ladder[:len(certified)] == certified

    model = tiny_timm_vit()
    pm = tpc.compile("models:cli_tiny_vit", recipe=out)
    images = np.load(data)["images"].transpose(0, 3, 1, 2)
    x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.25
    metric = Metric("cosine", "cosine")
    for part, (start, end) in (("tuning", (0, 30)), ("check", (30, 40))):
        got = _score(pm, (x[start:end],), model, None, metric)
        assert abs(got - saved["measured"][part]["pruned"]) < 1e-6
    assert [s.as_dict() for s in load_recipe(out).steps] == saved["steps"]


@pytest.mark.slow
def test_labels_make_top1_the_default_and_the_cli_writes_table_and_plot(tmp_path, capsys):
    from tpc.cli import main

    data = _images(tmp_path / "d.npz", labels=True)
    out, png = tmp_path / "r.json", tmp_path / "front.png"
    code = main(["tune", "models:cli_tiny_vit", "--data", str(data), "--max-drop", "100", "--time", "1s",
                 "--methods", "topk-cls", "--mean", MEAN, "--std", STD, "--plot", str(png), "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "Pareto front" in printed and "check" in printed and "recipes tried" in printed
    assert "selection (fixed-sequence test)" in printed and " certified " in printed  # the rule, rung by rung
    saved = json.loads(out.read_text())
    assert saved["metric"]["name"] == "top1" and png.read_bytes()[:4] == b"\x89PNG"
    pm = tpc.compile("models:cli_tiny_vit", recipe=out)
    arrays = np.load(data)
    x = (torch.from_numpy(arrays["images"].transpose(0, 3, 1, 2)).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        top1 = 100 * float((pm(x[:32]).argmax(-1) == torch.from_numpy(arrays["labels"][:32])).double().mean())
    assert abs(top1 - saved["measured"]["tuning"]["pruned"]) < 1e-9


@pytest.mark.slow
def test_text_encoder_tunes_on_token_arrays_with_cosine_by_default(tmp_path):
    ids, mask = text_inputs(24, seed=3)
    data = tmp_path / "text.npz"
    np.savez(data, mask=mask.numpy(), ids=ids.numpy())  # named after forward(ids, mask), any order in the file
    out = tmp_path / "r.json"
    result = run_tune("test_tune:tiny_sentence_encoder", data, max_drop=1.0, time_budget=1, methods="topk-mass",
                      check_split=0.25, output=out)
    saved = json.loads(out.read_text())
    assert result.metric.name == "cosine" and saved["metric"]["name"] == "cosine"
    assert saved["search"]["prefix_runs"] >= 1  # the layers before the first pruned one ran once, shared (BERT's unused pooler is no obstacle)
    model, _ = tiny_sentence_encoder()
    pm = tpc.compile(model, text_inputs(2), recipe=out)
    got = _score(pm, (ids[:18], mask[:18]), model, None, Metric("cosine", "cosine"))
    assert abs(got - saved["measured"]["tuning"]["pruned"]) < 1e-6
    # the graph the search scored is the graph `tpc compile` builds: [CLS] kept in place in both (the search
    # once found no prefix, having dropped BERT's unused pooler first, and kept other tokens on a few sentences)
    assert result.best.module.report.prefix == pm.report.prefix == 1
    with torch.no_grad():
        assert torch.equal(result.best.module(ids, mask), pm(ids, mask))


@pytest.mark.slow
@pytest.mark.parametrize(("ids", "words"), [
    (lambda ids: ids + 0.5, "not whole numbers"),  # once cut to ints without a word
    (lambda ids: np.where(ids == ids[0, 0], np.nan, ids), "not whole numbers"),  # once an internal error
    (lambda ids: ids.astype(str), "holds <U"),  # once an internal error (torch.from_numpy)
    (lambda ids: ids + 1000, "fails on the data"),  # beyond the vocabulary: once an internal error
    (lambda ids: ids[:, :-4], "pad or cut token ids"),  # another length: once no word of what to do
])
def test_token_arrays_the_model_cannot_take_are_refused_in_one_line(tmp_path, ids, words):
    good, mask = text_inputs(6, seed=3)
    data = tmp_path / "text.npz"
    np.savez(data, ids=ids(good.numpy()), mask=mask.numpy())
    with pytest.raises(TpcError, match=words):
        run_tune("test_tune:tiny_sentence_encoder", data, max_drop=1.0, time_budget=1, methods="topk-mass")


def test_one_example_is_refused_in_one_singular_line(tmp_path):
    with pytest.raises(TpcError, match=r"has 1 example: too few") as err:
        run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz", n=1), max_drop=0.5, mean=MEAN, std=STD)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_no_recipe_within_the_bound_says_so_with_the_tightest_bound(tmp_path):
    result = run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz", n=24, labels=True), max_drop=0.0, time_budget=1,
                      methods="topk-cls", mean=MEAN, std=STD, check_split=0, output=tmp_path / "r.json")
    table = result.table()
    assert result.best is None and not (tmp_path / "r.json").exists()
    assert f"(unpruned {result.unpruned:.2f}%)" in table and "nan" not in table  # the unpruned top-1 even with no pick
    assert "no recipe met the budget: the tightest bound was" in table and "--confidence" in table


@pytest.mark.slow
def test_ctrl_c_writes_the_best_so_far(tmp_path, monkeypatch):
    from tpc.tune import engine

    compile_once = engine.Engine.compile
    calls = []

    def interrupt_on_second(self, steps):  # the user presses Ctrl-C while the second recipe compiles
        calls.append(steps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return compile_once(self, steps)

    monkeypatch.setattr(engine.Engine, "compile", interrupt_on_second)
    out = tmp_path / "r.json"
    result = run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz"), max_drop=100, time_budget=600,
                      methods="topk-cls", mean=MEAN, std=STD, output=out)
    saved = json.loads(out.read_text())
    assert result.search["interrupted"] and saved["search"]["interrupted"]
    assert [s.as_dict() for s in load_recipe(out).steps] == [s.as_dict() for s in check_steps(calls[0])]


def test_halving_keeps_what_may_meet_the_budget_and_spans_the_front():
    def cand(flops, drop, se=0.1):
        c = Candidate([], "x", flops_ratio=flops)
        c.drop, c.se = drop, se
        return c

    search = Search(None, Metric("top1", "points"), [], torch.zeros(0), max_drop=0.5, max_flops=None, time_budget=1,
                    progress=False)
    hopeless = cand(0.3, 3.0)
    front = [cand(0.5, 0.6), cand(0.7, 0.2), cand(0.9, 0.0)]
    dominated = [cand(0.8, 0.4), cand(0.95, 0.3), cand(0.99, 0.35), cand(0.97, 0.1)]
    kept = search.select([hopeless, *front, *dominated], last=False)
    assert hopeless not in kept and all(c in kept for c in front) and len(kept) == 4


def _scored(flops, drop, se, n=2000):
    c = Candidate([], "x", flops_ratio=flops, scores=torch.zeros(n, dtype=torch.float64))
    c.drop, c.se = drop, se
    return c


def _search(candidates, max_drop=0.5, confidence=0.9):
    search = Search(None, Metric("top1", "points"), [], torch.zeros(0), max_drop=max_drop, max_flops=None, time_budget=1,
                    progress=False, confidence=confidence)
    search.candidates = list(candidates)
    return search


def test_the_pick_needs_its_drop_bound_within_the_budget_not_a_lucky_mean():
    """A noisy recipe whose observed drop is 0 is not proof of a drop <= 0.5 (the winner's curse)."""
    lucky, sure = _scored(0.6, 0.0, 0.4), _scored(0.8, 0.1, 0.1)
    search = _search([lucky, sure])
    assert search.best() is sure  # z = 1.28 at 90%: 0.1 + 0.13 <= 0.5 certified, then 0 + 0.51 > 0.5 stops the test
    assert search.single_method_best()["x"] is sure
    assert _search([lucky, sure], confidence=0.5).best() is lucky  # at 50% the bound is the mean


def test_the_pick_walks_a_ladder_by_flops_and_stops_at_the_first_failure():
    """Fixed-sequence test: most FLOPs first, each at the full confidence (z = 1.28 at 90%, not divided among
    the rungs), the pick the last certified before the first failure -- not a later rung that would pass."""
    safe = _scored(0.9, 0.0, 0.1)  # 0.13: certified
    mid = _scored(0.8, 0.1, 0.25)  # 0.42: certified (0.59 with Bonferroni over 4 rungs: z = 1.96)
    fails = _scored(0.7, 0.4, 0.2)  # 0.66: fails, the test stops here
    below = _scored(0.6, 0.0, 0.3)  # 0.38 would pass, but is never tested
    search = _search([below, fails, safe, mid])
    assert search.best() is mid
    assert search.ladder() == [safe, mid, fails, below]
    assert [c.certified for c in search.ladder()] == [True, True, False, None]
    assert search.certify() == [safe, mid]
    assert abs(mid.bound - (0.1 + NormalDist().inv_cdf(0.9) * 0.25)) < 1e-12
    assert _search([below, _scored(0.99, 0.7, 0.01)]).best() is None  # the safest fails: nothing is certified
    assert _search([mid, _scored(0.3, 0.0, 0.1, n=1000)]).best() is mid  # fewer examples: not on the ladder


def test_the_finalists_are_a_ladder_from_the_safest_recipe_spread_over_flops():
    """The last cut keeps the Pareto front of (FLOPs, bound), spread over FLOPs from its safest recipe down,
    never a dominated recipe (it could only stop the test before a better rung) and never only the most
    aggressive end of a long front (the finalists of a CIFAR run were once all aggressive, and none held)."""
    search = _search([])
    front = [_scored(1 - i / 100, i / 80, 0.2, n=1000) for i in range(1, 41)]  # fewer FLOPs, larger bound
    dominated = [_scored(0.955, 0.5, 0.2, n=1000), _scored(0.705, 1.0, 0.3, n=1000)]
    kept = search.select([*dominated, *front], last=True)
    assert len(kept) == FINALISTS and not any(c is d for c in kept for d in dominated)
    assert kept[0] is front[0] and kept[-1] is front[-1]  # from the safest to the most aggressive, in ladder order
    assert [c.flops_ratio for c in kept] == sorted((c.flops_ratio for c in kept), reverse=True)
    gaps = [a.flops_ratio - b.flops_ratio for a, b in zip(kept, kept[1:])]
    assert max(gaps) <= 2 * min(gaps) + 1e-9  # spread evenly, not bunched at one end
    assert len(search.select([*dominated, *front], last=False)) == 21  # earlier rounds: half, Pareto layer by layer


def test_at_most_a_few_finalists_reach_the_full_tuning_set():
    search = _search([])
    entrants = [_scored(1 - i / 100, i / 100, 0.01, n=500) for i in range(40)]
    assert len(search.select(entrants, last=False)) == 20
    assert len(search.select(entrants, last=True)) == FINALISTS


@pytest.mark.parametrize(("labels", "outputs", "warned"), [
    ([3, 3, 3, 3], 10, "every label is 3"), ([0, 1, 12, 2], 10, "run from 0 to 12"), ([0, 1, 9, 2], 10, None)])
def test_labels_that_look_meaningless_are_warned_about_in_one_line(caplog, labels, outputs, warned):
    from tpc.dataset import warn_if_labels_look_meaningless

    with caplog.at_level("WARNING", logger="tpc.dataset"):
        warn_if_labels_look_meaningless(torch.tensor(labels), outputs)
    lines = [r.getMessage() for r in caplog.records]
    assert (lines == []) if warned is None else (len(lines) == 1 and warned in lines[0] and "\n" not in lines[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_drop": 0.5, "confidence": 1.0}, "--confidence"),
    ({}, "give --max-drop"),
    ({"max_drop": 0.5, "time_budget": "soon"}, "--time takes a duration"),
    ({"max_drop": 0.5, "check_split": 1.0}, "--check-split"),
    ({"max_drop": 0.5, "methods": "tome,nope"}, "unknown pruning method"),
    ({"max_flops": 0.6, "target": "latency"}, "does not combine"),
    ({"max_drop": 0.5, "metric": "top1"}, "needs labels"),
    ({"max_drop": float("nan")}, "--max-drop nan"),
    ({"max_drop": 0.5, "time_budget": "0s"}, "leaves no time"),
    ({"max_drop": 0.5, "plot": "/nonexistent-dir/front.png"}, "of --plot does not exist"),
    ({"max_drop": 5.0, "metric": "cosine"}, "in cosine units"),  # points for a cosine budget: once accepted
    ({"max_drop": 0.5, "backend": "tensorrt", "batch": 8}, "add --target latency"),  # once a FLOPs recipe, flags ignored
    ({"max_drop": 0.5, "batch": 32}, "add --target latency"),  # not the evaluation batch: once silently ignored
    ({"max_drop": 0.5, "target": "latency", "batch": 0}, "--batch must be at least 1"),
])
def test_bad_tune_arguments_are_refused_in_one_line(tmp_path, kwargs, message):
    out = tmp_path / "r.json"
    with pytest.raises(tpc.TpcError, match=message) as err:
        run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz", n=8), mean=MEAN, std=STD, output=out, **kwargs)
    assert "\n" not in str(err.value) and not out.exists()


def test_a_latency_backend_tune_cannot_time_is_refused_before_the_model_loads():
    """Once refused only after loading, capturing and running the unpruned model on the whole tuning part."""
    for backend in ("garbage", "torch", "tensorrt"):
        with pytest.raises(TpcError, match=f"backend '{backend}': tpc tune --target latency runs onnxruntime"):
            run_tune("no_such_module:model", "no_such_data.npz", max_drop=0.5, target="latency", backend=backend)


def test_outputs_onto_the_data_or_each_other_are_refused_before_any_work(tmp_path):
    data = _images(tmp_path / "d.npz", n=8)
    before = data.read_bytes()
    for kwargs, message in (({"output": data}, "give it a .json name"), ({"output": tmp_path / "r.json", "plot": data},
                            "--plot .* is the --data file"), ({"output": tmp_path / "r.json", "plot": tmp_path / "r.json"},
                            "is also -o")):
        with pytest.raises(tpc.TpcError, match=message):
            run_tune("models:cli_tiny_vit", data, max_drop=100, time_budget=1, mean=MEAN, std=STD, **kwargs)
    assert data.read_bytes() == before and not (tmp_path / "r.json").exists()


def wide_tiny_vit():
    """For `tpc tune test_tune:wide_tiny_vit`: 64x64 images in 4x4 patches (257 tokens), so that pruning can pay in
    ONNX Runtime; one layer, so that its ONNX exports (most of the latency test's time) are short."""
    return tiny_timm_vit(img_size=64, patch_size=4, embed_dim=64, depth=1), (torch.randn(2, 3, 64, 64),)


@pytest.mark.slow
def test_latency_target_times_recipes_in_onnx_runtime_beside_the_unpruned_model(tmp_path, monkeypatch):
    """The timing is real (ONNX Runtime at --batch, interleaved with the unpruned model); which recipe runs
    faster on a busy machine is not fixed, so what is checked holds either way: every rung ran faster than
    the unpruned model, slowest first, and the pick is the fastest certified rung with its latency in
    recipe.json, or no recipe is written and the table says why. One recipe is timed (FINALISTS 1): each is an
    ONNX export, the most of this test's time (the ladder's order and the pick among several are checked with
    stand-in latencies below)."""
    from tpc.tune import search as search_module

    monkeypatch.setattr(search_module, "FINALISTS", 1)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "r.json"
    result = run_tune("test_tune:wide_tiny_vit", data, max_drop=1.0, metric="cosine", target="latency", batch=4,
                      time_budget=600, methods="topk-cls", mean=MEAN, std=STD, check_split=0, output=out)
    assert len(result.timed) == 1
    for c in result.timed:
        lat = c.latency
        assert lat["backend"] == "onnxruntime" and lat["batch"] == 4 and lat["pruned_ms"] > 0 and lat["unpruned_ms"] > 0
        assert lat["ratio"] == pytest.approx(lat["pruned_ms"] / lat["unpruned_ms"])
        assert 5 <= lat["iters"] <= 200  # at least 5 runs per repeat, more while a repeat lasts under 50 ms
    ratios = [c.latency["ratio"] for c in result.rungs]
    assert all(r < 1 for r in ratios) and ratios == sorted(ratios, reverse=True)
    table = result.table()
    if result.best is not None:
        saved = json.loads(out.read_text())
        assert saved["measured"]["latency"] == result.best.latency
        assert result.best is min((c for c in result.rungs if c.certified), key=lambda c: c.latency["ratio"])
        assert "slowest first (timed on onnxruntime at batch 4" in table
    else:
        assert not out.exists()
        assert "no recipe ran faster than the unpruned model" in table or "no recipe met the budget" in table


def _timed(flops, latency, drop, se):
    c = _scored(flops, drop, se)
    c.latency = {"ratio": latency, "backend": "onnxruntime", "batch": 1, "speedup_spread": [1 / latency, 1 / latency]}
    return c


def test_a_latency_ladder_goes_by_measured_latency_and_leaves_off_recipes_slower_than_unpruned():
    """Fewer FLOPs is not faster when a method's own ops cost time its FLOPs do not show (ToMe's merging at
    batch 1 on a small model ran slower than the unpruned model): the ladder is walked by latency, slowest
    first, and the pick is the fastest certified recipe, never one slower than not pruning."""
    merge = _timed(0.6, 0.95, 0.0, 0.1)  # fewer FLOPs, but its merging makes it the slower rung (bound 0.13)
    gather = _timed(0.8, 0.80, 0.1, 0.1)  # more FLOPs, faster, a larger bound (0.23)
    slower = _timed(0.5, 1.10, 0.0, 0.05)  # slower than unpruned: never on the ladder
    dominated = _timed(0.7, 0.85, 0.3, 0.1)  # slower than gather and a larger bound: not worth testing
    search = _search([merge, gather, slower])
    search.timer = object()  # every candidate is timed already: nothing is timed again
    assert search.ladder() == [merge, gather] and search.best() is gather  # both certified: the fastest
    assert search.single_method_best()["x"] is gather  # the baseline by the same rule (it was by FLOPs: merge)
    assert search.select([merge, gather, slower, dominated], last=True) == [merge, gather]  # spread over latency
    # at a budget of 0.2 the faster rung fails: walked by FLOPs it came first and stopped the test before the
    # slower, tighter one (no pick at all); walked by latency that one is certified first and picked
    tight = _search([merge, gather], max_drop=0.2)
    tight.timer = object()
    assert tight.best() is merge and [c.certified for c in tight.ladder()] == [True, False]
    search.candidates = [slower]
    assert search.ladder() == [] and search.best() is None
    noisy = _timed(0.66, 0.914, -0.3, 0.48)  # faster by the medians, one repeat 6% slower (CIFAR ViT, batch 1)
    noisy.latency["speedup_spread"] = [0.94, 1.22]
    search.candidates = [noisy]
    assert search.ladder() == [] and search.best() is None


def _search_info(**changes) -> dict:
    """recipe.json's ``search`` record of a one-recipe search, with ``changes``: for tables built by hand."""
    return {"tried": 1, "space": 1, "refused": 0, "skipped": 0, "rounds": [], "search_s": 1.0, "wall_s": 1.0,
            "interrupted": False, "out_of_time": False, "space_cut": False, "rule": "fixed-sequence",
            "confidence": 0.9, "z": 1.2816, **changes}


def test_when_no_timed_recipe_beats_the_unpruned_model_the_table_says_keep_it():
    from tpc.tune.run import TuneResult

    slower = _timed(0.5, 1.128, 0.0, 0.05)
    search = _search_info()
    table = TuneResult("m", Metric("top1", "points"), "d.npz", (0, 10), None, 1.0, None, None, None, [], None, None,
                       search, [slower], {"max_drop": 0.5, "target": "latency"}).table()
    assert "no recipe ran faster than the unpruned model" in table and "at 1.128 of its latency" in table
    assert "keep the unpruned model" in table and "no recipe met the budget" not in table


@pytest.mark.parametrize(("check_drop", "warned"), [(1.09, True), (0.41, False)])
def test_a_check_drop_beyond_the_budget_is_warned_about(check_drop, warned):
    """The latency search on the CIFAR ViT at batch 1 certified a recipe at a tuning bound of 0.32 points
    that loses 1.09 on the check images: the table says so, in one line, instead of leaving it to be read."""
    from tpc.tune.run import Measured, TuneResult

    pick = _scored(0.66, -0.3, 0.48)
    pick.bound, pick.certified = 0.32, True
    search = _search_info()
    table = TuneResult("m", Metric("top1", "points"), "d.npz", (0, 2000), (2000, 10000), 1.0, pick,
                       Measured(2000, 67.8, 68.1, -0.3, 0.32, 2000), Measured(8000, 70.11, 70.11 - check_drop, check_drop),
                       [], None, None, search, [pick], {"max_drop": 0.5, "target": "flops"}, rungs=[pick]).table()
    lines = [line for line in table.splitlines() if "warning" in line]
    assert len(lines) == int(warned)
    if warned:
        assert "on the check part the drop is 1.09 pt, beyond the budget of 0.50 pt" in lines[0]


@pytest.mark.slow
def test_ctrl_c_while_the_recipes_are_timed_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any recipe was timed: no latency pick exists yet. It once printed "no recipe met the
    budget" (nothing was tested against it) and exited 1, as if the search had finished."""
    from tpc.cli import main
    from tpc.tune.search import LatencyTimer

    timed = []

    def ctrl_c(self, c):
        timed.append(c)
        raise KeyboardInterrupt

    monkeypatch.setattr(LatencyTimer, "__call__", ctrl_c)
    out = tmp_path / "r.json"
    out.write_text("{}")  # an earlier recipe: kept as it was
    code = main(["tune", "models:cli_tiny_vit", "--data", str(_images(tmp_path / "d.npz", n=24)), "--max-drop", "1",
                 "--metric", "cosine", "--target", "latency", "--batch", "2", "--methods", "topk-cls", "--mean", MEAN,
                 "--std", STD, "--check-split", "0", "--time", "10m", "-o", str(out)])
    table = capsys.readouterr().out
    assert code == 130 and len(timed) == 1 and out.read_text() == "{}"
    assert "interrupted before any recipe was timed" in table and "nothing written" in table
    assert "(interrupted)" in table and "best so far" not in table  # there is none
    assert "no recipe met the budget" not in table


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "said"), [
    ("SIGINT", 130, "interrupted before any recipe was timed"), ("SIGTERM", 143, "tpc: terminated; nothing was written")])
def test_ctrl_c_or_sigterm_that_torch_export_turns_into_an_error_still_stops_the_search(
        tmp_path, monkeypatch, capsys, signum, code, said):
    """A signal whose handler runs inside torch's C++ argument parsing comes out as a TypeError ("set_(): argument
    'size' failed to unpack the object at pos 1 with error Terminated"), reported as the export failing: the recipe
    was counted as refused and the search went on timing the others, ignoring the Ctrl-C (or the SIGTERM)."""
    import signal

    from tpc.cli import main
    from tpc.tune.search import LatencyTimer

    timed = []

    def signal_then_export_error(self, c):
        timed.append(c)
        try:
            signal.raise_signal(getattr(signal, signum))  # tpc's handler runs here, as inside torch's C++ code
        except BaseException:  # what torch does: the handler's exception becomes another error
            pass
        raise TpcError("torch.export could not capture GraphModule with a dynamic batch: set_(): argument 'size' "
                       f"failed to unpack the object at pos 1 with error \"{signum}\"")

    monkeypatch.setattr(LatencyTimer, "__call__", signal_then_export_error)
    out = tmp_path / "r.json"
    got = main(["tune", "models:cli_tiny_vit", "--data", str(_images(tmp_path / "d.npz", n=24)), "--max-drop", "1",
                "--metric", "cosine", "--target", "latency", "--batch", "2", "--methods", "topk-cls", "--mean", MEAN,
                "--std", STD, "--check-split", "0", "--time", "10m", "-o", str(out)])
    printed = capsys.readouterr()
    assert got == code and len(timed) == 1 and not out.exists()
    assert said in printed.out + printed.err and "could not capture" not in printed.out + printed.err


def test_an_interrupted_latency_search_does_not_conclude_to_keep_the_unpruned_model():
    """One recipe timed, slower than the unpruned model, then Ctrl-C: the others were never timed, so the table
    must not say that pruning costs more than it saves here (it once did)."""
    from tpc.tune.run import TuneResult

    slower, untimed = _timed(0.5, 1.128, 0.0, 0.05), _scored(0.7, 0.0, 0.05)
    search = _search_info(tried=2, space=2, interrupted=True)
    table = TuneResult("m", Metric("top1", "points"), "d.npz", (0, 10), None, 1.0, None, None, None, [], None, None,
                       search, [slower, untimed], {"max_drop": 0.5, "target": "latency"}).table()
    assert "keep the unpruned model" not in table and "no recipe ran faster" not in table
    assert "interrupted before a pick: 1 recipe timed, none faster than the unpruned model so far" in table


def test_a_latency_search_interrupted_before_any_timing_says_so_not_that_no_recipe_met_the_budget():
    from tpc.tune.run import TuneResult

    search = _search_info(tried=5, space=9, interrupted=True)
    table = TuneResult("m", Metric("top1", "points"), "d.npz", (0, 10), None, 1.0, None, None, None, [], None, None,
                       search, [_scored(0.5, 0.0, 0.05)], {"max_drop": 0.5, "target": "latency"}).table()
    assert "interrupted before any recipe was timed" in table and "no recipe met the budget" not in table


@pytest.mark.slow
def test_max_flops_picks_the_best_metric_under_the_flops_budget(tmp_path):
    result = run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz", n=24), max_flops=0.9, time_budget=1,
                      methods="tome", mean=MEAN, std=STD, check_split=0, output=tmp_path / "r.json")
    tried = [c for c in result.candidates if c.n]
    assert tried and all(c.flops_ratio <= 0.9 for c in tried)
    assert result.best.drop == min(c.drop for c in tried if c.n == result.best.n)


def test_space_has_fine_tome_r_decreasing_schedules_and_gentle_mixes():
    from tpc.recipe import describe
    from tpc.tune.space import candidates

    space = [describe(s) for s in candidates(4, 65, 1, ["tome", "topk-mass"])]
    assert "tome@0 r=10, tome@1 r=10, tome@2 r=10, tome@3 r=10" in space  # r in steps of 64/32 = 2
    assert "tome@0 r=9, tome@1 r=7, tome@2 r=5, tome@3 r=3" in space  # ToMe's (6, -0.5)
    assert "tome@0 r=8, tome@1 r=8, topk-mass@2 keep 0.9, topk-mass@3 keep 0.9" in space
    assert len(space) == len(set(space))
    assert "tome@1 r=16, tome@2 r=16, tome@3 r=16" in space
    assert "tome@0 r=16, tome@1 r=16, tome@2 r=16, tome@3 r=16" not in space  # 16 tokens left at layer 3: 8 merges at most


@pytest.mark.slow
def test_tune_reads_images_and_files_as_tpc_eval_does(tmp_path):
    """One loader: float images already in [0, 1] are not divided by 255 again, and a file that is
    not an .npz is refused in one line."""
    from tpc.models import load
    from tpc.tune.data import load_tune_data

    loaded = load("models:cli_tiny_vit")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=images)
    np.savez(tmp_path / "f32.npz", images=(images / 255.0).astype(np.float32))
    as_uint8 = load_tune_data(tmp_path / "u8.npz", loaded, MEAN, STD).inputs[0]
    torch.testing.assert_close(load_tune_data(tmp_path / "f32.npz", loaded, MEAN, STD).inputs[0], as_uint8)
    (tmp_path / "d.txt").write_text("not arrays")
    with pytest.raises(tpc.TpcError, match="is not an .npz file"):
        load_tune_data(tmp_path / "d.txt", loaded, MEAN, STD)


@pytest.mark.slow
def test_recipes_the_compiler_refuses_are_counted_with_the_reason():
    """At a dynamic text length zero-tprune's similarity stage is refused: the table says why, once per method."""
    from tpc.tune.run import TuneResult
    from tpc.tune.search import refusals

    why = "zero-tprune's similarity stage needs a fixed sequence length, but layer 1 sees a dynamic one"
    tried = [Candidate([], "zero-tprune", refused=why), Candidate([], "zero-tprune", refused=why + " (2)"),
             _scored(0.8, 0.0, 0.001)]
    summary = refusals(tried)
    assert summary == {"zero-tprune": {"count": 2, "reason": why}}
    search = _search_info(tried=3, space=3, refused=2, refusals=summary, compared=1, compared_examples=2000)
    table = TuneResult("m", Metric("cosine", "cosine"), "d.npz", (0, 10), None, 1.0, None, None, None, [], None, None,
                       search, tried, {"max_drop": 0.01}).table()
    assert f"refused 2 zero-tprune recipe(s): {why}\n" in table


@pytest.mark.slow
def test_candidates_reuse_the_shapes_before_their_first_pruned_layer():
    """The captured graph's fake values are computed once; a candidate's passes recompute only what they changed."""
    from tpc.capture import capture
    from tpc.recipe import Step
    from tpc.tune.data import TuneData
    from tpc.tune.engine import Engine

    model = tiny_timm_vit()
    x = torch.randn(2, 3, 32, 32)
    engine = Engine(capture(model, (x,)), (x,), "tiny", TuneData((x,), None, "x"), 2)
    pm = engine.compile(check_steps([Step(1, "topk-cls", keep=0.5)]))
    cut = engine.cut(pm.graph_module)
    before = [n for n in list(pm.graph_module.graph.nodes)[:cut] if n.op == "call_function"]
    base = {n.name: n for n in engine.gm.graph.nodes}
    assert len(before) > 10 and all(n.meta["val"] is base[n.name].meta["val"] for n in before)


@pytest.mark.parametrize("name,off", [("top1", 100.0), ("agreement", 100.0), ("cosine", 0.01)])
def test_no_flip_seen_gets_the_standard_error_of_one_flipped_example(name, off):
    """A recipe that changed no prediction on n examples is not certified as if its drop were known
    exactly: its SE is the one it would have with one flipped example (spread off/sqrt(n), SE off/n),
    so a zero-flip rung's bound is drop + z·off/n, not a sqrt(n) times smaller number."""
    metric = Metric(name, "points")
    for n in (4, 400, 2000):
        base = torch.full((n,), 100.0 if name == "top1" else metric.best(0.0), dtype=torch.float64)
        one_flip = base.clone()
        one_flip[0] -= off
        drop, se = metric.drop(base.clone(), base)
        assert drop == 0.0 and se == pytest.approx(metric.drop(one_flip, base)[1]) and se == pytest.approx(off / n)


@pytest.mark.slow
def test_a_search_cut_by_time_reports_the_bound_its_test_used_and_the_drop_on_every_tuning_example(tmp_path, monkeypatch):
    """Time stops the search after its first candidate, scored on the first batch only: the pick's bound is
    the one the ladder tested, on those examples (recomputed on all of them, it could exceed the budget of a
    recipe already reported as certified); its drop is then measured on the whole tuning part."""
    clock = iter(range(1000))  # a second per look at the clock: the first round's half of 3 s lets one recipe in
    monkeypatch.setattr(Search, "elapsed", property(lambda self: next(clock)))
    out = tmp_path / "r.json"
    result = run_tune("models:cli_tiny_vit", _images(tmp_path / "d.npz", n=64), max_drop=1.0, metric="cosine",
                      time_budget=3, methods="topk-cls", mean=MEAN, std=STD, check_split=0, eval_batch=8, output=out)
    saved = json.loads(out.read_text())
    rung = next(r for r in saved["ladder"] if r["steps"] == saved["steps"])
    tuning = saved["measured"]["tuning"]
    assert saved["search"]["out_of_time"] and rung["examples"] == tuning["bound_examples"] == result.best.n < 64
    assert tuning["examples"] == 64 and tuning["bound"] == rung["bound"]
    assert f"on the first {result.best.n} examples, where time stopped the search" in result.table()


class _StandInTimer:
    """Stands in for the ONNX Runtime timing where what is tested is which recipes the search times, not how
    (the timing itself is tested against ONNX Runtime above): records each recipe, with the ratio given."""

    def __init__(self, ratio):
        self.ratio, self.calls = ratio, []

    def __call__(self, c):
        self.calls.append(c)
        c.latency = {"backend": "onnxruntime", "batch": 4, "unpruned_ms": 1.0, "pruned_ms": self.ratio(c),
                     "ratio": self.ratio(c), "speedup_spread": [1 / self.ratio(c), 1 / self.ratio(c)]}


def shallow_tiny_vit():
    """For `tpc tune test_tune:shallow_tiny_vit`: two layers, so that topk-cls has 10 recipes (2 starts x 5 keeps)."""
    return tiny_timm_vit(depth=2), (torch.randn(2, 3, 32, 32),)


def one_layer_tiny_vit():
    """For `tpc tune test_tune:one_layer_tiny_vit`: one layer, 5 topk-cls recipes (the cheapest search)."""
    return tiny_timm_vit(depth=1), (torch.randn(2, 3, 32, 32),)


def _tune_latency_with(timer, monkeypatch, tmp_path, n, model="test_tune:shallow_tiny_vit"):
    from tpc.tune import run as run_module

    monkeypatch.setattr(run_module, "LatencyTimer", lambda *args: timer)
    out = tmp_path / "r.json"
    result = run_tune(model, _images(tmp_path / "d.npz", n=n), max_drop=1.0, metric="cosine",
                      target="latency", batch=4, time_budget=600, methods="topk-cls", mean=MEAN, std=STD,
                      check_split=0, output=out)
    return result, out


@pytest.mark.slow
def test_after_a_last_cut_whose_recipes_all_ran_slower_nothing_more_is_timed(tmp_path, monkeypatch):
    """16 images, two rounds: the last cut times 2 of the 5 recipes (at most 2 here, for a small test); all
    run slower than the unpruned model. The 3 it left untimed are not timed after the search (each is an
    ONNX export and many runs, tens of seconds on a real model; they were once), and the table says why
    there is no pick."""
    from tpc.tune import search as search_module

    monkeypatch.setattr(search_module, "FINALISTS", 2)
    timer = _StandInTimer(lambda c: 1.5)
    result, out = _tune_latency_with(timer, monkeypatch, tmp_path, n=16, model="test_tune:one_layer_tiny_vit")
    assert result.search["rounds"][0]["scored"] == 5 and len(timer.calls) == 2
    assert result.best is None and not out.exists()
    assert "no recipe ran faster than the unpruned model" in result.table()


@pytest.mark.slow
def test_a_latency_search_past_its_time_budget_still_times_its_compared_recipes(tmp_path, monkeypatch):
    """8 images, one round that spends the whole --time: the recipes it scored are timed after it (at most
    FINALISTS, here 4, spread over FLOPs: timing is off the --time clock), and recipe.json's front has a
    bound for every recipe on it, timed or not (once NaN for those off the ladder)."""
    from tpc.tune import search as search_module

    monkeypatch.setattr(search_module, "FINALISTS", 4)
    first_round = Search._first_round

    def spends_the_budget(self, *args, **kwargs):
        entrants = first_round(self, *args, **kwargs)
        self.time_budget = 0.0
        return entrants

    monkeypatch.setattr(Search, "_first_round", spends_the_budget)
    timer = _StandInTimer(lambda c: c.flops_ratio)
    result, out = _tune_latency_with(timer, monkeypatch, tmp_path, n=8)
    assert result.search["rounds"] == [{"examples": 8, "scored": 10}]
    assert len(timer.calls) == 4 == len(set(map(id, timer.calls)))
    flops = sorted(c.flops_ratio for c in result.candidates)
    assert max(c.flops_ratio for c in timer.calls) == flops[-1] and min(c.flops_ratio for c in timer.calls) == flops[0]
    saved = json.loads(out.read_text())
    assert saved["measured"]["latency"] == result.best.latency and len(saved["timed"]) == 4
    ladder = saved["ladder"]  # the timed recipes faster than unpruned (all, here), slowest first; the last is picked
    assert [r["latency_ratio"] for r in ladder] == sorted((c.flops_ratio for c in timer.calls), reverse=True)
    assert ladder[-1]["steps"] == saved["steps"] and ladder[-1]["certified"]
    assert saved["front"] and all(math.isfinite(f["bound"]) for f in saved["front"])
    assert any(f["latency_ratio"] is None for f in saved["front"])  # an untimed recipe on the front, with its bound


@pytest.mark.slow
def test_the_latency_timing_is_off_the_time_budget_so_the_last_round_still_runs(tmp_path, monkeypatch):
    """On DeiT-S at batch 8 timing 11 recipes took about ten minutes: counted against a 10-minute --time it
    left the last round nothing, and the ladder was tested on half the tuning examples. Here each timing
    takes 1000 s of a stand-in clock against a 600 s budget, and the last round still scores every rung."""
    from tpc.tune import search as search_module

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 1e-3
            return cls.now

    monkeypatch.setattr(search_module, "time", Clock)
    first_round = Search._first_round

    def on_the_stand_in_clock(self, *args, **kwargs):
        self.start = Clock.perf_counter()
        return first_round(self, *args, **kwargs)

    monkeypatch.setattr(Search, "_first_round", on_the_stand_in_clock)

    def slow(c):
        Clock.now += 1000.0
        return c.flops_ratio

    result, out = _tune_latency_with(_StandInTimer(slow), monkeypatch, tmp_path, n=16)
    rounds = result.search["rounds"]
    assert len(rounds) == 2 and rounds[-1]["examples"] == 16 and rounds[-1]["scored"] >= 1
    assert not result.search["out_of_time"] and result.search["timing_s"] >= 1000
    assert json.loads(out.read_text())["ladder"][0]["examples"] == 16


@pytest.mark.slow
def test_a_recipe_onnx_cannot_time_is_counted_as_refused_and_the_search_goes_on(tmp_path, monkeypatch):
    """The ONNX export can refuse a recipe the torch pipeline took: it once ended the whole search (minutes
    of it) with that one line; now that recipe is refused with the reason, as the compiler's refusals are."""
    from tpc.errors import TpcError

    def refuse_the_first(c):
        if len(timer.calls) == 1:
            raise TpcError("ONNX export failed: some op")
        return c.flops_ratio

    timer = _StandInTimer(refuse_the_first)
    result, out = _tune_latency_with(timer, monkeypatch, tmp_path, n=16, model="test_tune:one_layer_tiny_vit")
    refused = [c for c in result.candidates if c.refused]
    assert len(refused) == 1 and refused[0].refused == "not timed: ONNX export failed: some op"
    assert result.best is not None and refused[0] not in result.rungs and out.exists()
    assert "refused 1 topk-cls recipe(s): not timed: ONNX export failed: some op" in result.table()


@pytest.mark.slow
def test_ctrl_c_while_timing_picks_among_the_recipes_already_timed(tmp_path, monkeypatch):
    def interrupt_on_third(c):
        if len(timer.calls) == 3:  # the user presses Ctrl-C while the third recipe is timed
            raise KeyboardInterrupt
        return c.flops_ratio

    timer = _StandInTimer(interrupt_on_third)
    result, out = _tune_latency_with(timer, monkeypatch, tmp_path, n=16, model="test_tune:one_layer_tiny_vit")
    saved = json.loads(out.read_text())
    assert saved["search"]["interrupted"] and len(saved["timed"]) == 2 and timer.calls[2].latency is None
    assert result.best is min(timer.calls[:2], key=lambda c: c.latency["ratio"])  # the fastest timed, certified
    assert saved["measured"]["latency"] == result.best.latency and "(interrupted: best so far)" in result.table()


def test_the_plot_shows_each_family_the_front_the_budget_and_the_pick(tmp_path):
    """tpc tune --plot's PNG from a result built by hand (the CLI test draws one from a real search)."""
    from PIL import Image

    from tpc.tune.report import plot_front
    from tpc.tune.run import TuneResult

    merge, gather, worse = _scored(0.6, 0.1, 0.1), _scored(0.8, 0.0, 0.1), _scored(0.7, 0.4, 0.1)
    merge.family = "tome"
    result = TuneResult("m", Metric("top1", "points"), "d.npz", (0, 10), None, 1.0, merge, None, None, [merge, gather],
                        None, None, _search_info(), [merge, gather, worse], {"max_drop": 0.5}, unpruned=0.9)
    plot_front(result, tmp_path / "front.png")
    assert Image.open(tmp_path / "front.png").format == "PNG" and [p.name for p in tmp_path.iterdir()] == ["front.png"]
