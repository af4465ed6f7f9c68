"""``tpc tune`` end to end: load, capture once, search, check on held-out data, write the recipe."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tpc import models
from tpc.backends import check_backend
from tpc.capture import capture, set_eval
from tpc.dataset import warn_if_labels_look_meaningless
from tpc.decode.capture import refuse_encoder_method
from tpc.errors import TpcError, refusal_or_bug
from tpc.exports.atomic import check_output_path, refuse_overwriting
from tpc.flops import count_flops
from tpc.pipeline import analyze
from tpc.recipe import Recipe, check_steps, describe
from tpc.registry import PruneMethod, Where, get_method
from tpc.tune.data import load_tune_data, split
from tpc.tune.engine import Engine
from tpc.tune.metrics import choose_metric, first_tensor
from tpc.tune.report import plot_front
from tpc.tune.search import Candidate, LatencyTimer, Search, compiled, refusals, runs_faster
from tpc.tune.space import candidates, searched_by_default
from tpc.version import __version__
from tpc.vlm.family import refuse_vlm

TARGETS = ("flops", "latency")


def parse_time(text) -> float:
    """``15m``, ``90s``, ``1h`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise TpcError(f"--time takes a duration such as 15m, 90s or 1h, not {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_methods(text) -> list[str]:
    if text is None:
        return searched_by_default()
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    for name in names:
        get_method(name, Where.ENCODER)
    if not names:
        raise TpcError("--methods is empty: name at least one method, e.g. --methods tome,topk-cls")
    return names


def _cannot_run(method: PruneMethod, sites, prefix: int) -> str | None:
    """Why ``method`` cannot prune this model (its capabilities against what the model has), or None."""
    if not method.takes_mask and any(site.mask is not None for site in sites):
        return f"the attention takes a mask ({method.name} refuses masks)"
    if method.needs_cls and prefix < 1:
        return "no [CLS] token found"
    return None


@dataclass
class Measured:
    examples: int
    unpruned: float
    pruned: float
    drop: float
    bound: float | None = None  # the selection rule's upper confidence bound on the drop (tuning part)
    bound_examples: int | None = None  # the tuning examples the bound was tested on (fewer when time cut the search)


@dataclass
class TuneResult:
    model: str
    metric: object
    data: str
    tuning_range: tuple[int, int]
    check_range: tuple[int, int] | None
    flops_before: float
    best: Candidate | None
    tuning: Measured | None
    check: Measured | None
    front: list[Candidate]
    baseline: Candidate | None  # the best single-method recipe
    baseline_check: Measured | None
    search: dict
    candidates: list[Candidate] = field(default_factory=list)
    budget: dict = field(default_factory=dict)
    recipe: Recipe | None = None
    output: str | None = None
    plot: str | None = None
    unpruned: float = 0.0  # mean of the unpruned model's per-example scores on the tuning part
    rungs: list[Candidate] = field(default_factory=list)  # the ladder, in the fixed-sequence test's order
    ladder: list[dict] = field(default_factory=list)  # the same, as recipe.json records it (Search.rung)
    baseline_tuning: Measured | None = None  # the best single-method recipe on the whole tuning part

    def table(self) -> str:
        m = self.metric
        lines = [f"{self.model}: {m.name} on examples {self.tuning_range[0]}-{self.tuning_range[1] - 1} of {self.data} "
                 f"(unpruned {m.format(self.base_value)})",
                 f"Ladder: the recipes scored on the most tuning examples, {self._order()}, tested in this order "
                 f"(front: on the Pareto front of FLOPs and drop)",
                 f"  {'recipe':<64} {'GFLOPs':>8} {'saved':>6} {m.name:>9} {'drop':>9} {'bound':>9} {'on':>5}  "
                 f"{'test':<11} {'front':<5}  latency"]
        rungs = self.rungs
        for c in rungs:
            lat = f"{100 * (1 - c.latency['ratio']):5.1f}% faster" if c.latency else ""
            mark = "*" if c is self.best else " "
            lines.append(f"{mark} {c.label[:64]:<64} {c.gflops:8.4f} {100 * (1 - c.flops_ratio):5.1f}% "
                         f"{m.format(self.base_value - c.drop):>9} {m.format_drop(c.drop):>9} {m.format_drop(c.bound):>9} "
                         f"{c.n:>5}  {self._verdict(c):<11} {'yes' if any(c is f for f in self.front) else '':<5}  {lat}".rstrip())
        s = self.search
        for method, why in s.get("methods_left_out", {}).items():
            lines.append(f"left out {method}: {why}")
        for family, refused in s.get("refusals", {}).items():
            lines.append(f"refused {refused['count']} {family} recipe(s): {refused['reason']}")
        rounds = " -> ".join(f"{r['scored']} on {r['examples']}" for r in s["rounds"])
        lines.append(f"search: {s['tried']} recipes tried ({s['refused']} refused by the compiler or the ONNX export, {s['skipped']} over "
                     f"the FLOPs budget), recipes scored per round (examples): {rounds}; "
                     f"{s['search_s']:.0f} s to the front, {s['wall_s']:.0f} s in all" + (f" (interrupted{': best so far' if self.best else ''})" if s["interrupted"] else "")
                     + (" (time budget reached)" if s["out_of_time"] else "")
                     + (f" (time budget: {s['space'] - s['tried']} recipes of the space not tried)" if s["space_cut"] else ""))
        if self.budget.get("max_flops") is None:
            tested = [c for c in rungs if c.certified is not None]
            stop = next((c for c in tested if not c.certified), None)
            lines.append(f"selection (fixed-sequence test): down the ladder, a recipe is certified when its drop's upper "
                         f"bound (one-sided {s['confidence']:.0%}, z = {s['z']:.2f} whatever the number of rungs) is within "
                         f"{m.format_drop(self.budget['max_drop'])}; the first that is not stops the test; the pick is the "
                         f"last certified: {len(tested) - (stop is not None)} of {len(rungs)} certified"
                         + (f", stopped at {stop.label} (bound {m.format_drop(stop.bound)})" if stop is not None else ""))
        timed = self.timed
        if timed:
            slower = [c for c in timed if not runs_faster(c)]
            lines.append(f"latency: {_count(len(timed), 'recipe')} timed in {s.get('timing_s', 0):.0f} s (apart from --time), each "
                         "side by side with the unpruned model; "
                         f"{len(slower)} no faster than it, left off the ladder")
            certified = [c for c in rungs if c.certified]
            lowest = min(certified, key=lambda c: c.flops_ratio, default=None)
            if self.best is not None and self.best is not lowest:
                lines.append(f"  picked by latency, not by FLOPs: {lowest.label} has fewer FLOPs ({lowest.flops_ratio:.3f} "
                             f"against {self.best.flops_ratio:.3f}) but ran at {lowest.latency['ratio']:.3f} of the "
                             f"unpruned latency, against {self.best.latency['ratio']:.3f}")
        if self.best is None and s["interrupted"]:  # the search did not finish: no conclusion about the model
            if self.budget.get("target") == "latency" and not timed:
                done = "interrupted before any recipe was timed: none is known to run faster than the unpruned model"
            elif self.budget.get("target") == "latency":
                faster = sum(runs_faster(c) for c in timed)
                done = (f"interrupted before a pick: {_count(len(timed), 'recipe')} timed, "
                        + (f"{faster} faster than the unpruned model, none certified" if faster else
                           "none faster than the unpruned model so far"))
            else:
                done = (f"interrupted before a pick: {_count(len(rungs), 'recipe')} on the ladder, "
                        "none certified")
            lines.append(f"{done}; none is picked, nothing written (let the search finish, or bound it with --time)")
            return "\n".join(lines)
        if self.best is None and timed and not rungs:
            fastest = min(timed, key=lambda c: c.latency["ratio"])
            low, high = fastest.latency["speedup_spread"]
            lines.append(f"no recipe ran faster than the unpruned model in every repeat (the fastest timed: {fastest.label}, "
                         f"at {fastest.latency['ratio']:.3f} of its latency, {low:.2f}-{high:.2f}x per repeat): at batch {fastest.latency['batch']} on "
                         f"{fastest.latency['backend']} pruning costs more than it saves here; keep the unpruned model, "
                         "or tune for a larger --batch")
            return "\n".join(lines)
        if self.best is None and not any(c.n for c in self.candidates) and (s["space_cut"] or s["out_of_time"]):
            lines.append("the time budget ran out before any recipe was scored: give more --time (e.g. --time 5m)")
            return "\n".join(lines)
        if self.best is None:
            tightest = min(rungs, key=lambda c: c.bound, default=None)
            lines.append("no recipe met the budget" + (
                f": the tightest bound was {m.format_drop(tightest.bound)} ({tightest.label})"
                + ("" if tightest is rungs[0] else f", but the test stops at the first rung, the "
                   f"{'slowest' if self.budget.get('target') == 'latency' else 'safest'}: {rungs[0].label}, "
                   f"bound {m.format_drop(rungs[0].bound)}")
                + "; more tuning examples narrow the bounds, a lower --confidence takes more risk" if tightest is not None and
                self.budget.get("max_drop") is not None else ""))
            return "\n".join(lines)
        lines.append(f"chosen: {self.best.label}: {100 * (1 - self.best.flops_ratio):.1f}% fewer FLOPs")
        if self.best.latency:
            lat = self.best.latency
            lines.append(f"  latency ({lat['backend']}, batch {lat['batch']}): {lat['pruned_ms']:.2f} ms vs "
                         f"{lat['unpruned_ms']:.2f} ms unpruned ({100 * (1 - lat['ratio']):.1f}% less)")
        for what, meas in (("tuning", self.tuning), ("check", self.check)):
            if meas is not None:
                lines.append(f"  {what:<6} ({_count(meas.examples, 'example')}): {m.name} {m.format(meas.pruned)} vs "
                             f"{m.format(meas.unpruned)} unpruned, drop {m.format_drop(meas.drop)}{self._bound(meas)}")
        budget = self.budget.get("max_drop")
        if self.check is not None and budget is not None and self.check.drop > budget:
            lines.append(f"  warning: on the check part the drop is {m.format_drop(self.check.drop)}, beyond the budget "
                         f"of {m.format_drop(budget)}: the tuning examples were kinder than the check ones; tune on more "
                         "examples, or ask for a higher --confidence or a smaller --max-drop")
        if self.baseline is not None:
            lines.append(f"best single method: {self.baseline.label}: {100 * (1 - self.baseline.flops_ratio):.1f}% fewer "
                         f"FLOPs" + (f", {100 * (1 - self.baseline.latency['ratio']):.1f}% faster" if self.baseline.latency
                                     else "") + f", tuning drop {m.format_drop(self.baseline_tuning.drop)}"
                         + (f", check drop {m.format_drop(self.baseline_check.drop)}" if self.baseline_check else ""))
        if self.output:
            lines.append(f"wrote {self.output}" + (f" and {self.plot}" if self.plot else ""))
        return "\n".join(lines)

    def _bound(self, meas: Measured) -> str:
        if meas.bound is None:
            return ""
        where = ("" if meas.bound_examples in (None, meas.examples) else
                 f" on the first {meas.bound_examples} examples, where time stopped the search")
        return f" (bound {self.metric.format_drop(meas.bound)}{where})"

    def _verdict(self, c) -> str:
        if self.budget.get("max_flops") is not None:
            return "within" if c.flops_ratio <= self.budget["max_flops"] else "over FLOPs"
        return {True: "certified", False: "FAILS: stop", None: "not tested"}[c.certified]

    def _order(self) -> str:
        if self.budget.get("target") != "latency":
            return "most FLOPs first"
        timed = self.timed
        where = f" on {timed[0].latency['backend']} at batch {timed[0].latency['batch']}" if timed else ""
        return f"slowest first (timed{where}, each faster than the unpruned model)"

    @property
    def timed(self) -> list:
        """The recipes timed for ``--target latency``, fastest first."""
        return sorted((c for c in self.candidates if c.latency), key=lambda c: c.latency["ratio"])

    @property
    def base_value(self) -> float:
        """The unpruned model's metric on the tuning part."""
        return self.metric.best(self.unpruned)


@torch.no_grad()
def _measure(module, data, metric, batch: int, reference: list | None = None):
    """Per-example scores of ``module`` on ``data`` (and the unpruned outputs, when computing them)."""
    scores, outs = [], []
    for i, start in enumerate(range(0, len(data), batch)):
        end = min(len(data), start + batch)
        out = first_tensor(module(*data.batch(start, end)))
        ref = out if reference is None else reference[i]
        outs.append(out)
        scores.append(metric.per_example(out, ref, None if data.labels is None else data.labels[start:end]))
    return torch.cat(scores), outs


def _measured(metric, scores, base_scores, bound=None, bound_examples=None) -> Measured:
    drop, _ = metric.drop(scores, base_scores)
    return Measured(len(scores), float(metric.best(float(base_scores.mean()))), float(scores.mean()), drop, bound,
                    bound_examples)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_tune(model, data, max_drop=None, target="flops", backend=None, batch=None, time_budget="15m",
             metric=None, max_flops=None, check_split=0.2, plot=None, output=None, methods=None, mean=None, std=None,
             eval_batch=None, after="attention", seed=0, load_kwargs=None, progress=None,
             example_inputs=None, confidence=0.9) -> TuneResult:
    """Search recipes for ``model`` (a model id, or an nn.Module with ``example_inputs``) on ``data``.

    See docs/tune.md; the arguments are the ``tpc tune`` flags.
    """
    start = time.perf_counter()
    if target not in TARGETS:
        raise TpcError(f"unknown --target {target!r}: choose flops or latency")
    if max_flops is None and max_drop is None:
        raise TpcError("give --max-drop (the largest metric drop allowed) or --max-flops (a FLOPs budget)")
    if max_flops is not None and not 0.0 < max_flops <= 1.0:
        raise TpcError(f"--max-flops {max_flops} is outside (0, 1]: it is the FLOPs ratio to the unpruned model")
    if max_flops is not None and target == "latency":
        raise TpcError("--max-flops picks the best metric under a FLOPs budget; it does not combine with --target latency")
    if max_drop is not None and not 0 <= max_drop < float("inf"):  # NaN too
        raise TpcError(f"--max-drop {max_drop} is not a finite drop of 0 or more: it is the largest metric drop "
                       "allowed (100 allows any top-1 drop)")
    if not 0.0 < confidence < 1.0:
        raise TpcError(f"--confidence {confidence} is outside (0, 1): it is the probability that the pick's drop "
                       "is within the budget, e.g. 0.9")
    if target == "latency":
        backend = check_backend(backend or "onnxruntime", ("onnxruntime",), "tpc tune --target latency")
        batch = 8 if batch is None else batch
        if batch < 1:
            raise TpcError("--batch must be at least 1")
    elif backend is not None or batch is not None:
        raise TpcError(f"--backend and --batch set how --target latency measures; with --target {target} they do "
                       "nothing: add --target latency, or drop them")
    seconds = parse_time(time_budget)
    if not seconds > 0:
        raise TpcError(f"--time {time_budget} leaves no time to search: give a duration such as 15m, 90s or 1h")
    method_list = parse_methods(methods)
    seed = models.check_seed(seed)
    _check_outputs(model, data, output, plot, (load_kwargs or {}).get("weights"))
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise TpcError("tuning an nn.Module needs example_inputs (a batch of at least 2)")
        loaded = models.LoadedModel(type(model).__name__, model, tuple(example_inputs))
    else:
        loaded = models.load(str(model), **(load_kwargs or {}))
        set_eval(loaded.module)  # tpc built this module: it is an inference model
        loaded.module.requires_grad_(False)
    refuse_vlm(loaded.module, "tune")
    refuse_encoder_method(loaded.module, loaded.name)
    models.refuse_pruned(loaded.module, loaded.name)
    dataset = load_tune_data(data, loaded, mean, std)
    tuning, check, cut = split(dataset, check_split)

    gm = capture(loaded.module, loaded.example_inputs)
    eval_batch = eval_batch or max(8, min(256, len(tuning) // 8))
    engine = Engine(gm, loaded.example_inputs, loaded.name, tuning, eval_batch, after, seed)
    sites, prefix = analyze(engine.gm, loaded.name), engine.prefix
    flops_before = count_flops(engine.gm).total
    try:
        references = [engine.reference(b) for b in range(len(engine.batches))]
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise refusal_or_bug(err, f"the unpruned {loaded.name} fails on the data in {data}: {type(err).__name__}: "
                                  f"{first} (token ids beyond the vocabulary? inputs in the wrong order?)") from err
    metric_obj = choose_metric(metric, tuning.labels, loaded.module, references[0])
    if metric_obj.name == "cosine" and max_drop is not None and max_drop > 1:
        raise TpcError(f"--max-drop {max_drop} is in cosine units with --metric cosine (1 − mean cosine): "
                       "e.g. --max-drop 0.01 asks for a mean cosine of at least 0.99")
    if metric_obj.name == "top1":
        warn_if_labels_look_meaningless(dataset.labels, references[0].reshape(len(references[0]), -1).shape[-1])
    base_scores = torch.cat([metric_obj.per_example(r, r, None if tuning.labels is None else tuning.labels[s:e])
                             for r, (s, e) in zip(references, engine.batches)])

    timer = LatencyTimer(engine, backend, batch) if target == "latency" else None
    search = Search(engine, metric_obj, references, base_scores, max_drop, max_flops, seconds,
                    sys.stderr.isatty() if progress is None else progress, confidence, timer)
    skipped = {m: why for m in method_list if (why := _cannot_run(get_method(m), sites, prefix))}
    space = candidates(len(sites), sites[0].tokens, prefix, [m for m in method_list if m not in skipped])
    if not space:
        raise TpcError(f"no method to search on {loaded.name}: " + "; ".join(f"{m}: {why}" for m, why in skipped.items()))
    search.run(space)
    search_s = time.perf_counter() - start  # loading, capture, the unpruned reference, the rounds and the timing
    best, front = search.best(), search.front()  # best() walks the ladder: each rung's bound and verdict
    ladder = search.ladder()
    for c in search.compared():  # the front's too: for a latency target it may hold recipes off the ladder
        c.bound = search.upper(c)
    baselines = search.single_method_best()
    baseline = min(baselines.values(), key=search.preference, default=None)

    ladder_records = [search.rung(c) for c in ladder]  # the test as it was made, before any rescoring below
    whole = {id(c): _on_whole_tuning_part(search, c) for c in (best, baseline) if c is not None}
    tuning_m = check_m = baseline_check = None
    if best is not None:
        tuning_m = _measured(metric_obj, whole[id(best)].scores, base_scores, best.bound, best.n)
        if check is not None and not search.interrupted:
            ref_scores, ref_outs = _measure(gm, check, metric_obj, eval_batch)
            check_m = _measured(metric_obj, _measure(compiled(engine, best), check, metric_obj, eval_batch, ref_outs)[0],
                                ref_scores)
            if baseline is not None and baseline is not best:
                baseline_check = _measured(metric_obj, _measure(compiled(engine, baseline), check, metric_obj, eval_batch,
                                                                ref_outs)[0], ref_scores)
            elif baseline is best:
                baseline_check = check_m
    s = search
    info = {
        "tried": len(s.candidates), "space": len(space), "refused": sum(c.refused is not None for c in s.candidates),
        "skipped": sum(c.refused is None and not c.n for c in s.candidates), "rounds": s.rounds,
        "prefix_runs": engine.prefix_runs, "search_s": search_s, "wall_s": time.perf_counter() - start, "timing_s": s.timing_s, "interrupted": s.interrupted,
        "out_of_time": s.out_of_time, "space_cut": s.space_cut, "methods_left_out": skipped,
        "refusals": refusals(s.candidates),
        "rule": "fixed-sequence", "confidence": confidence, "z": search.z, "compared": len(ladder),
        "compared_examples": ladder[0].n if ladder else 0, "screened_examples": search.screened(),
    }
    result = TuneResult(loaded.name, metric_obj, str(data), (0, cut), (cut, len(dataset)) if check is not None else None,
                        flops_before, best, tuning_m, check_m, front, baseline, baseline_check, info, s.candidates,
                        {"max_drop": max_drop, "max_flops": max_flops, "target": target},
                        unpruned=float(base_scores.mean()), rungs=ladder,
                        ladder=ladder_records, baseline_tuning=None if baseline is None else
                        _measured(metric_obj, whole[id(baseline)].scores, base_scores))
    if best is None:
        return result
    result.recipe = Recipe(check_steps(best.steps), after, seed, _recipe_info(result, loaded.name))  # options spelled out
    if output is not None:
        result.recipe.save(output)
        result.output = str(output)
    if plot:
        plot_front(result, plot)
        result.plot = str(plot)
    return result


def _check_outputs(model, data, output, plot, weights) -> None:
    """Before any work: -o a .json and --plot writable, neither one an input file nor each other."""
    if output is not None and Path(output).suffix.lower() != ".json":
        raise TpcError(f"-o {str(output)!r} is where the recipe goes, a JSON file: give it a .json name "
                       "(the artifact is written by tpc compile --recipe)")
    for flag, path in (("-o", output), ("--plot", plot)):
        if path:
            check_output_path(path, flag)
    refuse_overwriting([("-o", output), ("--plot", plot)], [("the model you tune", model),
                                                            ("the --weights file", weights), ("the --data file", data)])


def _on_whole_tuning_part(search: Search, c: Candidate) -> Candidate:
    """``c`` scored on every tuning example: when time cut the search before the last round, a copy is
    scored on the rest (``c`` itself keeps the numbers its rung was tested with)."""
    if search.interrupted or c.n == search.engine.batches[-1][1]:
        return c
    full = dataclasses.replace(c)
    compiled(search.engine, full)
    search.extend(full, len(search.engine.batches))
    return full


def _recipe_info(r: TuneResult, model: str) -> dict:
    best = r.best
    measured = {"flops_before": r.flops_before, "flops_after": r.flops_before * best.flops_ratio,
                "flops_ratio": best.flops_ratio, "tuning": asdict(r.tuning) if r.tuning else None,
                "check": asdict(r.check) if r.check else None, "latency": best.latency}
    return {
        "model": model, "tpc_version": __version__,
        "metric": {"name": r.metric.name, "unit": r.metric.unit, "max_drop": r.budget["max_drop"],
                   "max_flops": r.budget["max_flops"], "target": r.budget["target"]},
        "data": {"path": r.data, "tuning": list(r.tuning_range), "check": list(r.check_range) if r.check_range else None},
        "measured": measured,
        "baseline": None if r.baseline is None else {
            "recipe": describe(r.baseline.steps), "flops_ratio": r.baseline.flops_ratio, "tuning_drop": r.baseline_tuning.drop,
            "check_drop": r.baseline_check.drop if r.baseline_check else None},
        "ladder": r.ladder,
        "front": [{"recipe": c.label, "flops_ratio": c.flops_ratio, "drop": c.drop, "bound": c.bound, "examples": c.n,
                   "latency_ratio": c.latency["ratio"] if c.latency else None} for c in r.front],
        "timed": [{"recipe": c.label, "flops_ratio": c.flops_ratio, "drop": c.drop, "examples": c.n, **c.latency}
                  for c in r.timed],
        "search": r.search,
    }
