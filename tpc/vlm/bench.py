"""``tpc bench`` for a pruned VLM: prefill and one decode step, pruned against unpruned.

Both run in torch, side by side in one process (interleaved repeats, ``tpc.timing.time_pair``):
the prefill (``VlmModule.prefill`` on the same prompts: the captured graph, rewritten or not,
and the KV cache it fills), then one greedy decode step of the stock decoder layers over the
pruned cache against the same step over the unpruned one (with a sparse decode step,
``tpc.vlm.decode``: that step over the pruned cache against the stock dense one over the
unpruned cache; with a compressed KV cache: its step over the cache the rule kept of the
prompt). The KV-cache bytes are those the prefill leaves (a compressed cache: the budget it
keeps of them); the FLOPs ratio is the report's, counted on the graphs (``tpc.vlm.flops``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpc.compiled import recipe
from tpc.decode.compressed import CompressedDecoder, CompressedReport
from tpc.decode.kv_cache import kv_bytes as cache_bytes
from tpc.decode.side import side_inputs
from tpc.timing import BenchResult, PairTiming, machine_name, time_pair
from tpc.vlm.family import language_model
from tpc.vlm.module import Prefill, VlmModule, _decode_step, last_position


def kv_bytes(state: Prefill) -> int:
    """Bytes of the keys and values the prefill leaves in the cache, every layer."""
    return sum(t.numel() * t.element_size() for layer in state.cache.layers for t in (layer.keys, layer.values))


def decode_step(model: torch.nn.Module, state: Prefill) -> Callable[[], None]:
    """One greedy decode step (the first new token) over a copy of ``state``'s cache, cut back
    to the prefill's length after each call so every call runs the same step."""
    lm, head = language_model(model)
    token = state.logits[:, -1].argmax(-1)[:, None]
    position = last_position(state.positions) + 1
    valid = [torch.cat([v, torch.ones_like(v[:, :1])], 1) for v in state.valid]
    cache = copy.deepcopy(state.cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]

    def run() -> None:
        with torch.no_grad():
            _decode_step(lm, head, token, position, valid, cache)
        for layer, n in zip(cache.layers, lengths):  # views of the prefill's cache: no copy
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    return run


def sparse_decode_step(decoder, state: Prefill) -> Callable[[], None]:
    """One greedy decode step through ``decoder`` (a VLM's rewritten decode step, ``tpc.vlm.decode``) over
    ``state``'s cache (every layer the same length); the step returns the new keys and values and leaves the
    cache as it was, so every call runs the same step."""
    token = state.logits[:, -1].argmax(-1)[:, None]
    position = last_position(state.positions) + 1
    mask = torch.cat([state.valid[0], torch.ones_like(state.valid[0][:, :1])], 1).long()
    past = [t for layer in state.cache.layers for t in (layer.keys, layer.values)]
    side = side_inputs(decoder.plan, past, mask) if decoder.takes_bounds else None

    def run() -> None:
        decoder.step(token, position, mask, past, side)
    return run


def compressed_decode_step(pruned: VlmModule, state: Prefill) -> tuple[Callable[[], None], int]:
    """(one greedy decode step through ``pruned``'s compressed cache after the prompt, the bytes that cache
    holds); after each call the cache is put back as it was (every tensor it changes is replaced, not written),
    so every call runs the same step."""
    logits, cache = pruned.compressed_cache(state)
    token = logits.argmax(-1)[:, None]
    position = last_position(state.positions) + 1
    saved = [(dict(vars(layer)), dict(vars(layer.rule))) for layer in cache.layers]

    def run() -> None:
        pruned.decoder.step(cache, token, position)
        for layer, (own, rule) in zip(cache.layers, saved):
            vars(layer).update(own)
            vars(layer.rule).update(rule)
    return run, cache_bytes(cache)


def repeat_examples(inputs: dict, batch: int) -> dict:
    """Processor outputs for ``batch`` prompts: the example prompts taken in turn (each input's
    rows per example, such as LLaVA's images or Qwen2-VL's patches, move with their prompt)."""
    examples = inputs["input_ids"].shape[0]
    order = torch.arange(batch) % examples
    out = {}
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out[name] = x
            continue
        rows = x.shape[0] // examples
        out[name] = x.reshape(examples, rows, *x.shape[1:])[order].reshape(batch * rows, *x.shape[1:])
    return out


@dataclass
class VlmBenchRow:
    batch: int
    prefill: PairTiming
    decode: PairTiming  # one decode step over the unpruned cache (base) and the pruned one
    kv_bytes: tuple[int, int]  # unpruned, pruned
    flops_ratio: float  # pruned / unpruned prefill FLOPs (the report's, at batch 1)

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes[1] / self.kv_bytes[0]

    @property
    def of_limit(self) -> float:
        """Prefill speedup as a fraction of the FLOPs speedup (1.0: every saved FLOP became time)."""
        return self.prefill.speedup * self.flops_ratio


@dataclass
class VlmBenchResult(BenchResult):
    """An encoder's ``BenchResult`` with VLM rows: the prefill, a decode step, the KV cache."""

    rows: list[VlmBenchRow]

    def as_dict(self) -> dict:
        out = super().as_dict()  # each row with its of_limit
        for row, d in zip(self.rows, out["rows"]):
            d["kv_ratio"] = row.kv_ratio
        return out

    def table(self) -> str:
        lines = [*self.heading(),
                 f"{'batch':>5}  {'prefill ms unpruned -> pruned':>29}  {'speedup (spread)':>18}  {'FLOPs':>6}  "
                 f"{'of limit':>8}  {'decode-step ms':>17}  {'speedup':>7}  {'KV cache MB':>19}  {'ratio':>6}"]
        for r in self.rows:
            p, d = r.prefill, r.decode
            lines.append(
                f"{r.batch:>5}  {p.base.median_ms:>13.2f} -> {p.pruned.median_ms:<12.2f}  {p.speedup:>6.3f}x "
                f"({p.speedup_spread[0]:.2f}-{p.speedup_spread[1]:.2f})  {r.flops_ratio:>5.3f}x  {r.of_limit:>8.3f}  "
                f"{d.base.median_ms:>7.2f} -> {d.pruned.median_ms:<7.2f}  {d.speedup:>6.3f}x  "
                f"{r.kv_bytes[0] / 2**20:>8.3f} -> {r.kv_bytes[1] / 2**20:<8.3f}  {r.kv_ratio:>5.3f}x")
        return "\n".join(lines)


def bench_vlm(pruned: VlmModule, inputs: dict, name: str, batches: list[int], threads: int, warmup: int, iters: int,
              repeats: int) -> VlmBenchResult:
    """Time ``pruned`` against its unpruned prefill on ``inputs`` repeated to each batch size."""
    torch.set_num_threads(threads)
    base, model, report = pruned.unpruned(), pruned._model[0], pruned.report
    rows = []
    for batch in batches:
        x = repeat_examples(inputs, batch)
        prefill = time_pair(lambda: base.prefill(**x), lambda: pruned.prefill(**x), batch, warmup, iters, repeats)
        base_state, pruned_state = base.prefill(**x), pruned.prefill(**x)
        held = kv_bytes(pruned_state)
        if isinstance(pruned.decoder, CompressedDecoder):
            step, held = compressed_decode_step(pruned, pruned_state)
        elif pruned.decoder is not None:
            step = sparse_decode_step(pruned.decoder, pruned_state)
        else:
            step = decode_step(model, pruned_state)
        decode = time_pair(decode_step(model, base_state), step, batch, warmup, iters, repeats)
        rows.append(VlmBenchRow(batch, prefill, decode, (kv_bytes(base_state), held), report.flops_ratio))
    g = 1e9
    config = (f"{recipe(report)}; prefill FLOPs {report.flops_before / g:.4g} G -> {report.flops_after / g:.4g} G "
              f"({report.flops_ratio:.3f}x) for the {report.prompt_tokens}-token example prompt"
              + ("" if report.decode is None else f"; decode step: {_decode_summary(report)} "
                 "(timed against the stock dense step over the unpruned cache)"))
    return VlmBenchResult(name, "torch", threads, config, rows, machine_name())


def _decode_summary(report) -> str:
    if isinstance(report.decode, CompressedReport):
        return report.decode.summary()
    return report.decode.summary(report.layer_tokens[-1])
