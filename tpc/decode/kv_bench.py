"""``tpc bench`` for a compressed KV cache: bytes held and decode-step latency, compressed vs dense.

Both run the same captured step on the same random prompts ([batch, context] token ids, no
padding): the dense one over a cache that keeps every position, the compressed one over the
method's. After the prefill each generates ``warmup + iters × repeats`` greedy tokens; the steps
are timed one against the other, in an order that rotates each repeat (medians of the timed
steps). The bytes are the caches' own tensors (keys and values; the method's state apart).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from tpc.decode.compressed import CompressedDecoder
from tpc.decode.kv_cache import kv_bytes, state_bytes


@dataclass
class KVBenchRow:
    batch: int
    context: int
    new: int
    budget: int
    dense_prefill_mib: float
    kv_prefill_mib: float
    dense_after_mib: float
    kv_after_mib: float
    state_mib: float
    dense_ms: float
    kv_ms: float


@dataclass
class KVBenchResult:
    model: str
    summary: str
    threads: int
    rows: list[KVBenchRow]

    def as_dict(self) -> dict:
        return {"model": self.model, "recipe": self.summary, "threads": self.threads, "rows": [vars(r) for r in self.rows]}

    def table(self) -> str:
        lines = [f"{self.summary}; decode step in torch on the CPU ({self.threads} threads)",
                 "batch  context  new  budget/layer  KV MiB after prefill  KV MiB after new tokens  state MiB  "
                 "step ms dense -> compressed"]
        for r in self.rows:
            lines.append(f"{r.batch:5d}  {r.context:7d}  {r.new:3d}  {r.budget:12d}  "
                         f"{r.dense_prefill_mib:8.2f} -> {r.kv_prefill_mib:7.2f}  "
                         f"{r.dense_after_mib:11.2f} -> {r.kv_after_mib:7.2f}  {r.state_mib:9.2f}  "
                         f"{r.dense_ms:8.1f} -> {r.kv_ms:.1f} ({r.dense_ms / r.kv_ms:.2f}x)")
        return "\n".join(lines)


def bench_compressed(module: CompressedDecoder, batches: list[int], contexts: list[int], warmup: int = 1,
                     iters: int = 3, repeats: int = 3, threads: int | None = None) -> KVBenchResult:
    if threads:
        torch.set_num_threads(threads)
    dense = module.dense()
    vocab = module._model[0].config.vocab_size
    rows = []
    for batch in batches:
        for context in contexts:
            gen = torch.Generator().manual_seed(batch * 7919 + context)
            ids = torch.randint(0, vocab, (batch, context), generator=gen)
            runs = {}
            for name, decoder in (("dense", dense), ("kv", module)):
                logits, cache = decoder.prefill(ids)
                runs[name] = [decoder, cache, logits.argmax(-1)[:, None], kv_bytes(cache)]
            samples = {name: [] for name in runs}

            def step(name, timed):
                decoder, cache, token, _ = runs[name]
                start = time.perf_counter()
                logits = decoder.step(cache, token)
                if timed:
                    samples[name].append(time.perf_counter() - start)
                runs[name][2] = logits.argmax(-1)[:, None]

            for _ in range(warmup):
                step("dense", False), step("kv", False)
            for r in range(repeats):
                for name in (["dense", "kv"] if r % 2 == 0 else ["kv", "dense"]):
                    for _ in range(iters):
                        step(name, True)
            mib = 2 ** 20
            rows.append(KVBenchRow(batch, context, warmup + iters * repeats, runs["kv"][1].layers[0].rule.budget,
                                   runs["dense"][3] / mib, runs["kv"][3] / mib, kv_bytes(runs["dense"][1]) / mib,
                                   kv_bytes(runs["kv"][1]) / mib, state_bytes(runs["kv"][1]) / mib,
                                   statistics.median(samples["dense"]) * 1e3, statistics.median(samples["kv"]) * 1e3))
    return KVBenchResult(module.report.model, module.report.summary(), torch.get_num_threads(), rows)
