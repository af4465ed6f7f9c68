"""``tpc bench``: pruned against unpruned, side by side in one process, per batch size."""

from __future__ import annotations

import json
import os

import torch

import tpc
from tpc import decode, models
from tpc.backends import BACKENDS, check_backend
from tpc.capture import capture
from tpc.commands.arguments import load_kwargs, prune_kwargs
from tpc.decode.bench import bench_decode
from tpc.decode.capture import MAX_CACHE
from tpc.decode.kv_bench import bench_compressed
from tpc.errors import TpcError
from tpc.exports import to_onnx
from tpc.exports.onnx import check_onnx
from tpc.exports.onnxruntime import make_session
from tpc.exports.tensorrt import engine_runner, graph_engine, require_tensorrt
from tpc.registry import DEFAULT_METHOD
from tpc.timing import BenchResult, BenchRow, inserted_share, machine_name, time_pair, torch_inserted_share
from tpc.vlm.bench import VlmBenchResult, bench_vlm
from tpc.vlm.family import is_vlm


def run(args) -> int:
    result = run_bench(args.model, method=args.method, layers=args.layers, keep=args.keep, backend=args.backend,
                       batches=args.batch, threads=args.threads, warmup=args.warmup, iters=args.iters,
                       repeats=args.repeats, load_kwargs=load_kwargs(args), compile_kwargs=prune_kwargs(args),
                       contexts=args.context)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0


def parse_batches(text) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise TpcError(f"--batch takes sizes such as 1,8,32, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise TpcError(f"--batch sizes must be positive integers, not {text!r}")
    return values


def run_bench(model_id, method=DEFAULT_METHOD, layers=None, keep=None, backend=None, batches="1,8",
              threads=None, warmup=3, iters=10, repeats=5, load_kwargs=None, compile_kwargs=None,
              contexts="2048") -> BenchResult | VlmBenchResult:
    """Latency of the pruned model against the unpruned one, side by side, per batch size.

    ``backend``: onnxruntime (the default for encoders), torch or tensorrt. A vision-language
    model is measured in torch (prefill and one decode step, KV-cache bytes: tpc.vlm.bench).
    """
    if backend is not None:
        check_backend(backend, BACKENDS, "tpc bench")
    if backend == "tensorrt":
        require_tensorrt()
    if min(warmup, iters, repeats) < 0 or iters < 1 or repeats < 1:
        raise TpcError("--iters and --repeats must be at least 1, --warmup at least 0")
    sizes = parse_batches(batches)
    if threads is not None and threads < 1:
        raise TpcError(f"--threads {threads}: give at least 1 (or leave it out for all cores)")
    threads = threads or os.cpu_count() or 1
    if decode.kv_eviction(method) or decode.decode_time(method):
        return _bench_decoder(model_id, method, layers, keep, backend, sizes, contexts, threads, warmup, iters,
                              repeats, load_kwargs, compile_kwargs)
    loaded = models.load(str(model_id), **(load_kwargs or {}))
    decode.refuse_decode_step(loaded.module, loaded.name)
    models.refuse_pruned(loaded.module, loaded.name)
    if is_vlm(loaded.module):
        return _bench_vlm(loaded, method, layers, keep, backend, sizes, threads, warmup, iters, repeats,
                          compile_kwargs)
    backend = backend or "onnxruntime"
    pruned = tpc.compile(loaded.module, loaded.example_inputs, method=method, layers=layers, keep=keep,
                         **(compile_kwargs or {}))
    report = pruned.report
    flops_speedup = report.flops_before / report.flops_after
    base_gm = capture(loaded.module, loaded.example_inputs)
    rows = []
    if backend == "onnxruntime":
        base_model, pruned_model = to_onnx(base_gm, loaded.example_inputs), to_onnx(pruned.graph_module, loaded.example_inputs)
        check_onnx(pruned_model, pruned.graph_module, [loaded.example_inputs], "pruned ONNX model")
        base_s = make_session(base_model.SerializeToString(), threads)
        pruned_s = make_session(pruned_model.SerializeToString(), threads)
        name = base_s.get_inputs()[0].name
    elif backend == "tensorrt":
        profile = (1, max(sizes), max(sizes))
        base_plan, _ = graph_engine(base_gm, loaded.example_inputs, profile, "fp16")
        pruned_plan, _ = graph_engine(pruned.graph_module, loaded.example_inputs, profile, "fp16")
    else:
        torch.set_num_threads(threads)
    for batch in sizes:
        x = torch.randn(batch, *loaded.example_inputs[0].shape[1:], generator=torch.Generator().manual_seed(batch))
        if backend == "onnxruntime":
            feeds = {name: x.numpy()}
            timing = time_pair(lambda: base_s.run(None, feeds), lambda: pruned_s.run(None, feeds), batch, warmup, iters, repeats)
            share = inserted_share(pruned_model, feeds, threads, iters=max(3, iters))
        elif backend == "tensorrt":
            xh = (x.half(),)
            timing = time_pair(engine_runner(base_plan, xh), engine_runner(pruned_plan, xh), batch, warmup, iters, repeats)
            share = float("nan")  # TensorRT fuses the inserted nodes; its profiler is not wired in
        else:
            with torch.no_grad():
                timing = time_pair(lambda: base_gm(x), lambda: pruned(x), batch, warmup, iters, repeats)
            share = torch_inserted_share(pruned, (x,), iters=max(3, iters))
        rows.append(BenchRow(batch, timing, flops_speedup, share))
    config = f"{report.recipe()}; FLOPs {report.flops_before / 1e9:.3f} G -> {report.flops_after / 1e9:.3f} G"
    return BenchResult(loaded.name, backend, threads, config, rows, machine_name())


def _bench_vlm(loaded, method, layers, keep, backend, sizes, threads, warmup, iters, repeats, compile_kwargs):
    """A VLM: prefill and one decode step in torch, pruned against unpruned (tpc.vlm.bench)."""
    if backend not in (None, "torch"):
        raise TpcError(f"tpc bench measures a vision-language model in torch (its decode step runs the stock decoder "
                       f"layers in Python): --backend {backend} is for encoders; drop it or pass --backend torch")
    pruned = tpc.compile(loaded.module, loaded.example_inputs, method=method, layers=layers, keep=keep,
                         **(compile_kwargs or {}))
    return bench_vlm(pruned, loaded.example_inputs, loaded.name, sizes, threads, warmup, iters, repeats)


def _contexts(backend, contexts) -> list[int]:
    """--context as cached positions; a backend other than torch refused (decoders are measured in torch)."""
    if backend not in (None, "torch"):
        raise TpcError(f"tpc bench measures a decode step in torch: --backend {backend} is for encoders; drop it or "
                       "pass --backend torch")
    try:
        lengths = [int(v) for v in str(contexts).split(",") if v.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise TpcError(f"--context takes cached positions such as 2048,8192, not {contexts!r}")
    if max(lengths) > MAX_CACHE:
        raise TpcError(f"--context {max(lengths)}: a decode step takes at most {MAX_CACHE} cached positions")
    return lengths


def _bench_decoder(model_id, method, layers, keep, backend, sizes, contexts, threads, warmup, iters, repeats,
                   load_kwargs, compile_kwargs):
    """A decoder LM: one decode step dense vs sparse vs the ideal (decode-time, tpc.decode.bench), or
    the bytes held and decode-step latency, compressed vs dense (KV eviction, tpc.decode.kv_bench).
    Compiled by tpc.compile with every setting given, so one the method does not take is refused."""
    lengths = _contexts(backend, contexts)
    module = tpc.compile(str(model_id), method=method, layers=layers, keep=keep, **(compile_kwargs or {}),
                         **(load_kwargs or {}))
    bench = bench_compressed if decode.kv_eviction(method) else bench_decode
    return bench(module, sizes, lengths, warmup, iters, repeats, threads)
