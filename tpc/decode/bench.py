"""``tpc bench`` for decode-time methods: one decode step, dense vs sparse vs the ideal, side by side.

Every step runs on the same random KV cache of ``context`` positions per layer (no padding).
The *ideal* is the dense step whose sparse layers' caches physically hold only ``keep``
positions (no scoring, no gather): the most the method can save on this machine. A quest
step gets its page bounds (a dhsa step its chunk summaries) computed before the timing, as
``generate()`` keeps them beside the cache (their update, one page or chunk per layer per
token, is not timed). The three
are timed interleaved (the order rotates each repeat), medians over every repeat.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import fx

from tpc.decode.capture import decoder_spec
from tpc.decode.module import DecodeModule
from tpc.decode.side import side_inputs
from tpc.passes import PassManager
from tpc.registry import Where, get_method


@dataclass
class DecodeBenchRow:
    batch: int
    context: int
    dense_ms: float
    sparse_ms: float
    ideal_ms: float
    dense_mib: float  # KV bytes the step reads, all layers
    sparse_mib: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def ideal_speedup(self) -> float:
        return self.dense_ms / self.ideal_ms


@dataclass
class DecodeBenchResult:
    model: str
    recipe: str
    threads: int
    rows: list[DecodeBenchRow]

    def as_dict(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "threads": self.threads,
                "rows": [{**vars(r), "speedup": r.speedup, "ideal_speedup": r.ideal_speedup} for r in self.rows]}

    def table(self) -> str:
        lines = [f"{self.model}, decode step in torch on the CPU ({self.threads} threads); {self.recipe}",
                 "batch  context  dense ms  sparse ms  ideal ms  speedup  ideal speedup  of ideal  KV MiB read "
                 "dense -> sparse"]
        for r in self.rows:
            lines.append(f"{r.batch:5d}  {r.context:7d}  {r.dense_ms:8.1f}  {r.sparse_ms:9.1f}  {r.ideal_ms:8.1f}  "
                         f"{r.speedup:6.2f}x  {r.ideal_speedup:12.2f}x  {r.speedup / r.ideal_speedup:7.2f}  "
                         f"{r.dense_mib:.1f} -> {r.sparse_mib:.1f} ({r.dense_mib / r.sparse_mib:.1f}x)")
        return "\n".join(lines)


def ideal_step(module: DecodeModule) -> fx.GraphModule:
    """The dense step with the sparse layers reading whatever cache they are given (the ideal)."""
    gm = module._program.module()
    rewrite = get_method(module.plan.method, Where.DECODE).implementation(Where.DECODE)
    PassManager([rewrite(module.plan, ideal=True)])(gm)
    for guard in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(guard)  # export's check that every cache has one length: the ideal's are shorter
    past = [n for n in gm.graph.nodes if n.op == "placeholder"][3:]
    short = {past[2 * i + j] for i in module.plan.sparse for j in (0, 1)}
    for size in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int):
        if size.args[0] in short:  # the cache length the dense layers use, read from layer 0's cache instead
            size.args = (past[0], *size.args[1:])
    gm.recompile()
    return fx.GraphModule(gm, gm.graph)


def _inputs(model, batch: int, context: int, sparse: list[int], keep: int):
    """Head inputs, the random cache, and the ideal's cache (``keep`` positions in the sparse layers)."""
    layers, heads, width = decoder_spec(model)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    past = [torch.randn(batch, heads, context, width, generator=gen).to(dtype) for _ in range(2 * layers)]
    short = [p[:, :, :keep].contiguous() if i // 2 in sparse else p for i, p in enumerate(past)]
    ids = torch.zeros(batch, 1, dtype=torch.long)
    return (ids, torch.full((batch, 1), context), torch.ones(batch, context + 1, dtype=torch.long)), past, short


def bench_decode(module: DecodeModule, batches: list[int], contexts: list[int], warmup: int = 1, iters: int = 3,
                 repeats: int = 3, threads: int | None = None) -> DecodeBenchResult:
    model = module._model[0]
    if threads:
        torch.set_num_threads(threads)
    dense, ideal = module.unpruned(), ideal_step(module)
    plan, report = module.plan, module.report
    rows = []
    for batch in batches:
        for context in contexts:
            head, past, short = _inputs(model, batch, context, plan.sparse, plan.positions(context))
            bounds = (side_inputs(plan, past, head[2]),) if module.takes_bounds else ()  # kept beside the cache
            runs = {"dense": lambda: dense.gm(*head, past), "sparse": lambda: module.gm(*head, past, *bounds),
                    "ideal": lambda: ideal(*head, short)}
            times = _interleaved(runs, warmup, iters, repeats)
            rows.append(DecodeBenchRow(batch, context, times["dense"], times["sparse"], times["ideal"],
                                       dense.report.kv_bytes(context, batch) / 2**20,
                                       report.kv_bytes(context, batch) / 2**20))
    layers = f"page {plan.page}, quest layers" if plan.page else \
        "chunks of {}-{}, threshold {:g}, dhsa layers".format(*plan.chunk) if plan.chunk else "selection layers"
    recipe = f"{plan.method}, {layers} {list(plan.selection)}, keep {plan.keep}, " \
             f"{len(plan.sparse)} of {plan.layers} layers sparse"
    return DecodeBenchResult(type(model).__name__, recipe, torch.get_num_threads(), rows)


def _interleaved(runs: dict, warmup: int, iters: int, repeats: int) -> dict[str, float]:
    samples = {name: [] for name in runs}
    names = list(runs)
    with torch.no_grad():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(iters):
                    start = time.perf_counter()
                    runs[name]()
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}
