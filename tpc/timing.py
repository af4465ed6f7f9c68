"""Side-by-side latency of a pruned and an unpruned model, and the cost of the inserted nodes.

Timings on a shared machine drift, so the two models are timed interleaved in one process
(alternating which goes first in each repeat) and compared as a ratio; the spread of the
per-repeat ratios shows how noisy the run was.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx
import torch
from torch.profiler import ProfilerActivity, profile

from tpc.exports.onnxruntime import make_session


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    throughput: float  # examples per second at the median latency


@dataclass
class PairTiming:
    base: Timing
    pruned: Timing
    speedup: float  # median of the per-repeat speedups (so it lies within their spread)
    speedup_spread: tuple[float, float]  # min and max of the per-repeat speedups
    batch: int
    repeats: int
    iters: int

    def as_dict(self) -> dict:
        return asdict(self)


def _stats(samples: list[float], batch: int) -> Timing:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Timing(median * 1e3, p90 * 1e3, batch / median)


def time_pair(run_base: Callable[[], object], run_pruned: Callable[[], object], batch: int,
              warmup: int = 3, iters: int = 10, repeats: int = 5) -> PairTiming:
    for _ in range(warmup):
        run_base()
        run_pruned()
    base_runs, pruned_runs = [], []
    for r in range(repeats):
        per = {}
        order = (("base", run_base), ("pruned", run_pruned))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            samples = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            per[name] = samples
        base_runs.append(per["base"])
        pruned_runs.append(per["pruned"])
    return pair_timing(base_runs, pruned_runs, batch)


def pair_timing(base_runs: list[list[float]], pruned_runs: list[list[float]], batch: int) -> PairTiming:
    """Latencies from every sample; the speedup and its spread from each repeat's median ratio. (The
    ratio of the pooled medians can fall outside the per-repeat spread, a figure its own range denies.)"""
    ratios = [statistics.median(b) / statistics.median(p) for b, p in zip(base_runs, pruned_runs)]
    base, pruned = _stats(sum(base_runs, []), batch), _stats(sum(pruned_runs, []), batch)
    return PairTiming(base, pruned, statistics.median(ratios), (min(ratios), max(ratios)), batch, len(base_runs),
                      len(base_runs[0]))


def tpc_node_names(model: onnx.ModelProto) -> set[str]:
    """ONNX nodes that implement tpc:: ops or side gathers (from the exporter's fx_node metadata)."""
    names = set()
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.fx_node" and "torch.ops.tpc." in prop.value:
                names.add(node.name)
    return names


def inserted_share(model: onnx.ModelProto, feeds: dict, threads: int | None, iters: int = 20) -> float:
    """Fraction of ONNX Runtime's run time spent in the inserted nodes (from its profiler)."""
    inserted = tpc_node_names(model)
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(model.SerializeToString(), threads, profile=os.path.join(tmp, "ort"))
        for _ in range(iters):
            session.run(None, feeds)
        path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
    run_time = sum(e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    node_time = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and e["name"][: -len("_kernel_time")] in inserted)
    return node_time / run_time if run_time else 0.0


def torch_inserted_share(module, inputs: tuple, iters: int = 10) -> float:
    """Fraction of a torch module's forward time spent inside tpc:: ops (torch profiler)."""
    with torch.no_grad():
        module(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                module(*inputs)
    inserted = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("tpc::"))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return inserted / total if total else 0.0


@dataclass
class BenchRow:
    batch: int
    timing: PairTiming
    flops_speedup: float  # unpruned FLOPs / pruned FLOPs
    inserted_share: float

    @property
    def of_limit(self) -> float:
        """Measured speedup as a fraction of the FLOPs speedup (1.0 = every saved FLOP became time)."""
        return self.timing.speedup / self.flops_speedup


@dataclass
class BenchResult:
    model: str
    backend: str
    threads: int
    config: str
    rows: list[BenchRow]
    machine: str

    def as_dict(self) -> dict:
        out = asdict(self)
        for row, d in zip(self.rows, out["rows"]):
            d["of_limit"] = row.of_limit
        return out

    def heading(self) -> list[str]:
        """The model and configuration, then the backend, threads and machine: the table's first lines."""
        return [f"{self.model}: {self.config}", f"{self.backend}, {self.threads} threads, on {self.machine}"]

    def table(self) -> str:
        lines = [*self.heading(),
                 f"{'batch':>5}  {'unpruned ms (p90)':>18}  {'pruned ms (p90)':>16}  {'speedup (spread)':>19}  "
                 f"{'FLOPs':>6}  {'of limit':>8}  {'inserted':>8}"]
        for r in self.rows:
            t = r.timing
            lines.append(
                f"{r.batch:>5}  {t.base.median_ms:>8.2f} ({t.base.p90_ms:>7.2f})  {t.pruned.median_ms:>7.2f} ({t.pruned.p90_ms:>6.2f})  "
                f"{t.speedup:>6.3f}x ({t.speedup_spread[0]:.2f}-{t.speedup_spread[1]:.2f})  {r.flops_speedup:>5.3f}x  "
                f"{r.of_limit:>8.3f}  " + ("       -" if math.isnan(r.inserted_share) else f"{100 * r.inserted_share:>7.2f}%")
            )
        return "\n".join(lines)


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"
