"""``tpc tune``: the fastest recipe within an accuracy budget, found on the user's own data.

*Within the budget* is a claim about the user's data, not about the tuning examples. The
recipes that reach the full tuning set form a *ladder* ordered by FLOPs, most FLOPs (the
safest) first, and the pick is made by a fixed-sequence test (Maurer, Hothorn & Lehmacher
1995; Westfall & Krishen, J. Stat. Plan. Inference 2001): going down the ladder, each rung's
hypothesis "its true drop exceeds the budget" is rejected (the rung is *certified*) when
drop + z·SE ≤ budget, with z = Φ⁻¹(confidence) and SE the standard error of the paired
per-example drop; the test stops at the first rung that fails, and the pick is the last rung
certified. An order fixed before the test controls the family-wise error at 1 − confidence
with no multiplicity correction, so every certified rung's true drop is within the budget
with probability ≥ ``confidence`` jointly, however long the ladder. Taking the lowest-FLOPs
recipe whose *observed* drop is within the budget would pick the luckiest of many noisy
estimates (the winner's curse). Two approximations remain: the rungs were chosen by
screening rounds on the first part of the same examples their bounds use (a milder winner's
curse, docs/tune.md "What the rule does not cover"; ``rung`` records each rung's bound on the
unseen part), and the bound is the normal (Wald) one, with one flipped example as the least
SE (``Metric.drop``), which is optimistic on a few dozen examples.

Successive halving (Jamieson & Talwalkar, AISTATS 2016; Li et al., Hyperband, JMLR 2018):
every candidate is scored on the first n0 tuning examples; only the promising ones go on to
2·n0, 4·n0 … and the full tuning set. *Promising*, for "lowest FLOPs with a drop ≤ budget",
means the drop could still be within the budget (drop − 2·standard error ≤ budget); of those
at most half go on, taken Pareto layer by Pareto layer in (FLOPs, bound) and spread over FLOPs,
so the front keeps its span. The last cut keeps only the Pareto front of (FLOPs, bound), spread
over FLOPs from its safest recipe down: a dominated rung could only stop the test before a
better one. With ``max_flops`` (best metric under a FLOPs budget), candidates over the budget
are never run and the better half by drop goes on.

With ``target="latency"``, latency decides what is tested and what is picked: at the last cut
the promising recipes are exported to ONNX and timed side by side with the unpruned model
(``LatencyTimer``), those no faster than the unpruned model are dropped, and the Pareto front of
(latency, bound) goes on; the ladder is walked slowest first, so the pick, the last certified
rung, is the fastest certified. A method's own ops cost time its FLOPs do not show (ToMe's
matching and merging, a greedy selection loop), so fewer FLOPs is not always faster. Along a
(latency, bound) front the bound grows as the latency falls, as it does with FLOPs on a FLOPs
front; walked by FLOPs instead, a faster rung with more FLOPs and a larger bound would come
first and could stop the test before a slower, tighter one. The latencies are measured apart
from the per-example drops the test uses, so an order by them is fixed before the test as the
rule needs. The timing (at most ``FINALISTS`` exports, tens of seconds each on a real model) is
off the ``time_budget`` clock and reported apart: counted in, it starved the last round, and the
test ran on half the tuning examples. The held-out check part is scored only at the end, for
the chosen recipe and the best single-method recipe.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from statistics import NormalDist

import torch

from tpc import signals
from tpc.errors import TpcError
from tpc.exports import to_onnx
from tpc.exports.onnxruntime import make_session
from tpc.flops import count_flops
from tpc.recipe import Step, check_steps, describe
from tpc.timing import time_pair
from tpc.tune.engine import Engine
from tpc.tune.metrics import Metric
from tpc.tune.space import family_of

FINALISTS = 12  # at most this many recipes reach the full tuning set: the rungs of the ladder


@dataclass(eq=False)  # a candidate is itself: compared by identity
class Candidate:
    steps: list[Step]
    family: str
    module: object = None
    gflops: float = 0.0
    flops_ratio: float = 1.0
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    drop: float = float("nan")
    se: float = float("inf")
    bound: float = float("nan")  # drop + z·se at the end of the search (the selection rule's number)
    certified: bool | None = None  # the ladder's verdict: True certified, False failed (the test stopped), None not tested
    refused: str | None = None
    latency: dict | None = None

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def label(self) -> str:
        return describe(self.steps)


@dataclass
class Search:
    """The state of one search: what was tried and how far each candidate got."""

    engine: Engine
    metric: Metric
    references: list[torch.Tensor]  # the unpruned outputs, per batch
    base_scores: torch.Tensor  # the unpruned model's per-example scores
    max_drop: float | None
    max_flops: float | None
    time_budget: float
    progress: bool
    confidence: float = 0.9
    timer: LatencyTimer | None = None  # set for a latency target: the ladder goes by measured latency
    candidates: list[Candidate] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    interrupted: bool = False
    out_of_time: bool = False  # a later round stopped for the time budget
    space_cut: bool = False  # the first round stopped before the end of the space for the time budget
    cut_timed: bool = False  # latency target: the last cut timed its recipes
    timing_s: float = 0.0  # latency target: seconds spent exporting and timing recipes, off the --time clock

    # -- scoring -------------------------------------------------------------------------------

    def extend(self, c: Candidate, batches: int) -> None:
        """Score ``c`` on the first ``batches`` batches (only the ones it has not seen)."""
        done = sum(1 for s, e in self.engine.batches[:batches] if e <= c.n)
        parts = [c.scores]
        for b in range(done, batches):
            out = self.engine.outputs(c.module, b)
            s, e = self.engine.batches[b]
            parts.append(self.metric.per_example(out, self.references[b], self.engine.data.labels[s:e]
                                                 if self.engine.data.labels is not None else None))
        c.scores = torch.cat(parts)
        c.drop, c.se = self.metric.drop(c.scores, self.base_scores)

    @property
    def elapsed(self) -> float:
        """Seconds of search against ``time_budget``: the latency timing is off this clock (it would starve
        the last round, which the test's bounds need)."""
        return time.perf_counter() - self.start - self.timing_s

    def compared(self) -> list[Candidate]:
        """The recipes the pick is chosen among: every one scored on the most examples any reached."""
        scored = [c for c in self.candidates if c.n and c.refused is None]
        n = max((c.n for c in scored), default=0)
        return [c for c in scored if c.n == n]

    @property
    def z(self) -> float:
        """One-sided normal quantile at ``confidence``: every rung is tested at the full confidence."""
        return NormalDist().inv_cdf(self.confidence)

    def upper(self, c: Candidate) -> float:
        """The drop's one-sided upper confidence bound."""
        return c.drop + self.z * c.se

    def cost(self, c: Candidate) -> float:
        """What the search minimises: the latency ratio to the unpruned model for a latency target (once
        timed), else the FLOPs ratio."""
        return c.latency["ratio"] if self.timer is not None else c.flops_ratio

    def ladder(self) -> list[Candidate]:
        """The compared recipes in the fixed-sequence test's order: most FLOPs (the safest) first; for a
        latency target only those timed faster than the unpruned model, slowest first."""
        rungs = self.compared()
        if self.timer is not None:
            rungs = [c for c in rungs if runs_faster(c)]
        return sorted(rungs, key=lambda c: (-self.cost(c), c.label))

    def certify(self) -> list[Candidate]:
        """Walk the ladder: each rung is certified while its bound is within the budget; the first
        that is not stops the test and the rungs below it are not tested. Returns the certified rungs."""
        certified: list[Candidate] = []
        stopped = False
        for c in self.ladder():
            c.bound = self.upper(c)
            c.certified = None if stopped else c.bound <= self.max_drop
            stopped = stopped or not c.certified
            if c.certified:
                certified.append(c)
        return certified

    def screened(self) -> int:
        """How many tuning examples chose the ladder: those of the round before the one the ladder reached
        (0 when a single round scored every recipe). The rungs' bounds use these examples too."""
        n = max((c.n for c in self.compared()), default=0)
        return max((r["examples"] for r in self.rounds if r["examples"] < n), default=0)

    def rung(self, c: Candidate) -> dict:
        """One rung as recipe.json records it, with its drop on the examples that chose the ladder and its
        drop and bound on the ones that did not (what a bound free of the selection would have said)."""
        seen = self.screened()
        out = {"recipe": c.label, "steps": [s.as_dict() for s in check_steps(c.steps)], "flops_ratio": c.flops_ratio,
               "drop": c.drop, "se": c.se, "bound": self.upper(c), "examples": c.n, "certified": c.certified,
               "latency_ratio": c.latency["ratio"] if c.latency else None}
        if 0 < seen < c.n:
            drop, se = self.metric.drop(c.scores[seen:], self.base_scores[seen:c.n])
            out["screened"] = {"examples": seen, "drop": self.metric.drop(c.scores[:seen], self.base_scores[:seen])[0]}
            out["unseen"] = {"examples": c.n - seen, "drop": drop, "bound": drop + self.z * se}
        return out

    def within(self) -> list[Candidate]:
        """The recipes within the budget: the certified rungs (``max_flops``: the compared ones under it)."""
        if self.max_flops is not None:
            return [c for c in self.compared() if c.flops_ratio <= self.max_flops]
        return self.certify()

    def best(self) -> Candidate | None:
        """The last certified rung, i.e. the lowest FLOPs (latency target: the fastest) certified
        (``max_flops``: the smallest drop within the FLOPs budget)."""
        return min(self.within(), key=self.preference, default=None)

    def preference(self, c: Candidate) -> tuple:
        """What ranks recipes within the budget, the best first: the FLOPs ratio, or the latency ratio for a
        latency target, then the drop (``max_flops``: the drop, then the FLOPs)."""
        return (c.drop, c.flops_ratio) if self.max_flops is not None else (self.cost(c), c.drop)

    # -- progress ------------------------------------------------------------------------------

    def show(self, what: str) -> None:
        if not self.progress:
            return
        best = self.best()
        line = f"\rtune {int(self.elapsed) // 60}m{int(self.elapsed) % 60:02d}s | {what}"
        if best is not None:
            line += (f" | best: {best.label} ({100 * (1 - best.flops_ratio):.1f}% fewer FLOPs, "
                     f"drop {self.metric.format_drop(best.drop)} on {best.n})")
        sys.stderr.write(line[:240].ljust(120))
        sys.stderr.flush()

    # -- the rounds ----------------------------------------------------------------------------

    def select(self, entrants: list[Candidate], last: bool) -> list[Candidate]:
        """The entrants that go on to more examples; ``last``: the next round is the full tuning set, and
        what goes on is the ladder (the Pareto front of FLOPs, or measured latency, and bound, spread over
        FLOPs or latency)."""
        cap = max(4, math.ceil(len(entrants) / 2))
        if last:
            cap = min(cap, FINALISTS)
        if self.max_flops is not None:
            return sorted(entrants, key=lambda c: c.drop)[:cap]
        hopeful = [c for c in entrants if c.drop - 2 * c.se <= self.max_drop]
        cost = (lambda c: c.flops_ratio)
        if last and self.timer is not None:
            hopeful = [c for c in self.time_recipes(spread(hopeful, FINALISTS)) if runs_faster(c)]
            self.cut_timed = True
            cost = self.cost
        bound = {id(c): self.upper(c) for c in hopeful}  # ranked by the bound the final test will need
        kept: list[Candidate] = []
        while hopeful and len(kept) < cap:  # Pareto layers of (cost, bound)
            layer = [c for c in hopeful if not any(
                cost(o) <= cost(c) and bound[id(o)] < bound[id(c)] or
                cost(o) < cost(c) and bound[id(o)] <= bound[id(c)] for o in hopeful)]
            kept += spread(layer, cap - len(kept), cost)
            if last:
                break
            hopeful = [c for c in hopeful if c not in layer]
        return kept

    def run(self, space: list[list[Step]]) -> None:
        batches = len(self.engine.batches)
        sizes = sorted({min(batches, 2 ** k) for k in range(batches.bit_length() + 1)})
        sizes = sizes[-4:] if len(sizes) > 4 else sizes  # at most four rounds
        try:
            entrants = self._first_round(space, sizes[0], last=len(sizes) == 1)
            for i, size in enumerate(sizes[1:], 1):
                survivors = self.select(entrants, last=i == len(sizes) - 1)
                self.rounds[-1]["kept"] = len(survivors)
                for c in entrants:
                    if c not in survivors:
                        c.module = None  # free the graph
                entrants = []
                for c in survivors:
                    if self.elapsed > self.time_budget:
                        self.out_of_time = True
                        break
                    self.show(f"round {i + 1}/{len(sizes)} ({self._examples(size)} examples) {len(entrants) + 1}/{len(survivors)}")
                    self.extend(c, size)
                    entrants.append(c)
                self.rounds.append({"examples": self._examples(size), "scored": len(entrants)})
                if self.out_of_time:
                    break
            if self.timer is not None and not self.cut_timed:  # a single round, or time ran out before the last cut
                self.time_recipes(spread([c for c in self.compared() if not c.latency], FINALISTS))
        except KeyboardInterrupt:
            self.interrupted = True
        except Exception:
            if signals.received() != signal.SIGINT:
                signals.raise_if_signalled()  # SIGTERM that torch turned into another error: unwind
                raise
            self.interrupted = True  # Ctrl-C that torch turned into another error
        finally:
            if self.progress:
                sys.stderr.write("\n")
        if self.interrupted:
            signals.clear()  # taken: the best so far is written

    def time_recipes(self, recipes: list[Candidate]) -> list[Candidate]:
        """Time the recipes not yet timed, off the search's clock; returns the timed ones. A recipe the ONNX
        export or ONNX Runtime refuses is counted as refused, with the reason, and the search goes on."""
        for c in recipes:
            if not c.latency and c.refused is None:
                self.show(f"latency of {c.label}")
                start = time.perf_counter()
                try:
                    self.timer(c)
                except TpcError as err:
                    signals.raise_if_signalled()  # not a refusal: Ctrl-C that torch.export turned into an error
                    c.refused = f"not timed: {err}"
                finally:
                    self.timing_s += time.perf_counter() - start
        return [c for c in recipes if c.latency]

    def _examples(self, batches: int) -> int:
        return self.engine.batches[batches - 1][1]

    def _first_round(self, space: list[list[Step]], size: int, last: bool) -> list[Candidate]:
        base = count_flops(self.engine.gm).total
        entrants = []
        self.rounds.append({"examples": self._examples(size), "scored": 0})
        for i, steps in enumerate(space):
            if self.elapsed > self.time_budget * (1.0 if last else 0.5):  # the later rounds get the other half
                self.space_cut = True
                break
            self.show(f"round 1 ({self._examples(size)} examples) {i + 1}/{len(space)}")
            c = Candidate(steps, family_of(steps))
            self.candidates.append(c)
            try:
                c.module = self.engine.compile(steps)
            except TpcError as err:
                signals.raise_if_signalled()  # not a refusal: Ctrl-C that torch turned into an error
                c.refused = str(err)
                continue
            c.gflops = c.module.report.flops_after / 1e9
            c.flops_ratio = c.module.report.flops_after / base
            if self.max_flops is not None and c.flops_ratio > self.max_flops:
                c.module = None
                continue
            self.extend(c, size)
            entrants.append(c)
            self.rounds[-1]["scored"] += 1
        return entrants

    def front(self) -> list[Candidate]:
        """Non-dominated (FLOPs, drop) recipes among those scored on the most examples."""
        scored = [c for c in self.candidates if c.n and c.refused is None]
        if not scored:
            return []
        n = max(c.n for c in scored)
        full = [c for c in scored if c.n == n]
        out = [c for c in full if not any(o.flops_ratio <= c.flops_ratio and o.drop < c.drop or
                                          o.flops_ratio < c.flops_ratio and o.drop <= c.drop for o in full)]
        return sorted(out, key=lambda c: c.flops_ratio)

    def single_method_best(self) -> dict[str, Candidate]:
        """Per single-method family, its best recipe within the budget (same rule as the overall best)."""
        out: dict[str, Candidate] = {}
        for c in self.within():
            if "+" not in c.family and (c.family not in out or self.preference(c) < self.preference(out[c.family])):
                out[c.family] = c
        return out


def runs_faster(c: Candidate) -> bool:
    """Timed faster than the unpruned model: by the ratio of the medians and in every repeat (all 3 by chance
    alone: 1 in 8). A ratio near 1 on a busy machine is noise: a CIFAR ViT pick at batch 1 was 8.6% faster
    by the medians with a repeat 6% slower."""
    return bool(c.latency) and c.latency["ratio"] < 1 and min(c.latency["speedup_spread"]) > 1


def spread(recipes: list[Candidate], n: int, cost=lambda c: c.flops_ratio) -> list[Candidate]:
    """At most ``n`` of ``recipes`` spread over ``cost`` (FLOPs), most first: the most and the least, and
    in between the recipe nearest each of n evenly spaced levels."""
    ordered = sorted(recipes, key=lambda c: (-cost(c), c.label))
    if len(ordered) <= n:
        return ordered
    if n < 2:
        return ordered[:n]
    top, bottom = cost(ordered[0]), cost(ordered[-1])
    chosen: list[Candidate] = []
    for j in range(n):
        level = top - j * (top - bottom) / (n - 1)
        chosen.append(min((c for c in ordered if not any(c is o for o in chosen)), key=lambda c: abs(cost(c) - level)))
    return sorted(chosen, key=lambda c: (-cost(c), c.label))


def compiled(engine: Engine, c: Candidate):
    """The candidate's compiled module, compiled again if the search freed it (it did not go on to a round)."""
    if c.module is None:
        c.module = engine.compile(c.steps)
    return c.module


def refusals(candidates: list[Candidate]) -> dict[str, dict]:
    """Per method (or mix), how many of its recipes the compiler refused and the first reason."""
    out: dict[str, dict] = {}
    for c in candidates:
        if c.refused is not None:
            entry = out.setdefault(c.family, {"count": 0, "reason": c.refused})
            entry["count"] += 1
    return out


class LatencyTimer:
    """Times a candidate's ONNX export in ONNX Runtime at ``batch``, side by side with the unpruned model
    (interleaved, ``tpc.timing.time_pair``), and records the ratio in ``candidate.latency``. Each of the 3
    repeats runs each model at least 5 times and for at least ``REPEAT_S`` (as ``timeit``'s autorange
    does): the CIFAR ViT runs in 1.4 ms at batch 1, and 5 runs of it on a busy machine once timed a
    recipe 77% faster while the recipes around it ran slower than the unpruned model."""

    REPEAT_S = 0.05

    def __init__(self, engine: Engine, backend: str, batch: int, threads: int | None = None):
        self.engine, self.backend, self.batch, self.threads = engine, backend, batch, threads
        x = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() if t.shape[0] < batch else t[:batch]
                  for t in engine.data.batch(0, batch))
        self.base = make_session(to_onnx(engine.gm, engine.example_inputs).SerializeToString(), threads)
        self.feeds = {i.name: t.numpy() for i, t in zip(self.base.get_inputs(), x)}
        self.base.run(None, self.feeds)  # warm up
        start = time.perf_counter()
        self.base.run(None, self.feeds)
        self.iters = min(200, max(5, math.ceil(self.REPEAT_S / (time.perf_counter() - start))))

    def __call__(self, c: Candidate) -> None:
        onnx_model = to_onnx(compiled(self.engine, c).graph_module, self.engine.example_inputs)
        session = make_session(onnx_model.SerializeToString(), self.threads)
        timing = time_pair(lambda: self.base.run(None, self.feeds), lambda: session.run(None, self.feeds), self.batch,
                           warmup=2, iters=self.iters, repeats=3)
        c.latency = {"backend": self.backend, "batch": self.batch, "iters": self.iters, "unpruned_ms": timing.base.median_ms,
                     "pruned_ms": timing.pruned.median_ms, "ratio": timing.pruned.median_ms / timing.base.median_ms,
                     "speedup_spread": list(timing.speedup_spread)}
