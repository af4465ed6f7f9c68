"""One prepared GPU check for tpc's kernels and pruned models; prints a table last.

1. kernel correctness: the Triton kernels (compiled for the GPU) against the reference ops,
   fp32/fp16/bf16, K = 1, K = N, channel counts that are not powers of two, batch > 1;
   and the same kernels as the TensorRT plugins compile them ahead of time, launched by Triton;
2. gather_tokens bandwidth as a fraction of a device-to-device copy of the same bytes (goal >= 0.8);
3. sparse_attention (output + per-key mass) against PyTorch SDPA on already-gathered K/V (goal: no slower);
4. DeiT-S and DeiT-B (random weights, fp16): the pruned torch module's throughput against the
   unpruned one at batch 256 (topk-cls, zero-tprune, topk-mass), next to the FLOPs ratio (goal >= 0.95 of it).

Run by benchmarks/gpu_check.sh on a machine with one NVIDIA GPU and PyTorch + Triton + timm;
nothing is downloaded. Each section reports its own failure and the rest still run.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS: list[tuple[str, str, str, str]] = []  # (check, measured, goal, verdict)


def cuda_time(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def section(name):
    def wrap(fn):
        def run():
            t = time.time()
            try:
                fn()
            except Exception as err:  # report and go on: one call should tell as much as it can
                traceback.print_exc()
                ROWS.append((name, f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:80]}", "", "fail"))
            print(f"[{name}] {time.time() - t:.1f} s", flush=True)
        return run
    return wrap


@section("kernel correctness")
def kernels():
    from tpc.kernels import triton_kernels as tk
    from tpc.methods import tome

    ops = torch.ops.tpc
    g = torch.Generator(device="cuda").manual_seed(0)
    failures, cases = [], 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for b, n, k, c in ((2, 9, 1, 5), (3, 197, 197, 384), (8, 197, 138, 130), (1, 50, 7, 768)):
            x = torch.randn(b, n, c, device="cuda", generator=g).to(dtype)
            idx = torch.sort(torch.rand(b, n, device="cuda", generator=g).argsort(1)[:, :k], 1).values
            cases += 1
            if not torch.equal(tk.gather_tokens(x, idx), torch.gather(x, 1, idx[..., None].expand(-1, -1, c))):
                failures.append(f"gather {dtype} {b, n, k, c}")
            r = (n - 1) // 3
            _kept, assign = tome.bipartite_match(torch.randn(b, n, 16, device="cuda", generator=g), r, 1)
            w = torch.rand(b, n, device="cuda", generator=g) + 0.5
            got, got_w = tk.merge_tokens(x, w, assign, n - r, True)
            want, want_w = tome.merge_tokens(x, w, assign, n - r, True)
            cases += 1
            if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol) or not torch.allclose(got_w, want_w):
                failures.append(f"merge {dtype} {b, n, r, c}")
            h, d = 3, (64 if c >= 64 else 24)
            q = torch.randn(b, h, k, d, device="cuda", generator=g).to(dtype)
            kk = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
            v = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
            for index in (idx, None):
                out, mass = tk.sparse_attention(q, kk, v, index, d ** -0.5)
                # the reference op on the CPU (on CUDA the op dispatches to the kernel itself)
                want, want_mass = ops.sparse_attention(q.cpu(), kk.cpu(), v.cpu(), None if index is None else index.cpu(), d ** -0.5)
                cases += 1
                if not torch.allclose(out.float().cpu(), want.float(), atol=tol * 5, rtol=tol * 5) \
                        or not torch.allclose(mass.cpu(), want_mass, atol=1e-2, rtol=1e-2):
                    failures.append(f"sparse_attention {dtype} {b, h, k, n, d} index={index is not None}")
    # the registered CUDA implementations are what the ops dispatch to on the GPU
    x = torch.randn(2, 9, 5, device="cuda")
    idx = torch.tensor([[0, 3, 4], [0, 1, 8]], device="cuda")
    cases += 1
    if not torch.equal(ops.gather_tokens(x, idx), torch.gather(x, 1, idx[..., None].expand(-1, -1, 5))):
        failures.append("dispatch gather_tokens")
    ROWS.append(("kernel correctness", f"{cases - len(failures)}/{cases} cases pass" + (f" ({'; '.join(failures[:3])})" if failures else ""),
                 "all", "ok" if not failures else "fail"))


@section("TensorRT plugin kernels")
def plugin_kernels():
    """The kernels as the TensorRT plugins compile them (tpc/kernels/aot.py: fixed types, scale and
    blocks, inputs / int32 scalars / outputs), launched by Triton on this GPU against the reference ops."""
    import triton

    from tpc.kernels import aot
    from tpc.kernels.triton_kernels import attention_block, gather_block

    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    g = torch.Generator(device="cuda").manual_seed(1)
    failures, cases = [], 0
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        b, n, k, c = 4, 197, 138, 384
        x = torch.randn(b, n, c, device="cuda", generator=g).to(dtype)
        idx = torch.sort(torch.rand(b, n, device="cuda", generator=g).argsort(1)[:, :k], 1).values.contiguous()
        kernel = aot.gather_ptx(name, "i64", gather_block(c), arch)
        out = torch.empty(b, k, c, device="cuda", dtype=dtype)
        kernel.compiled[(b * k, triton.cdiv(c, gather_block(c)), 1)](x, idx, k, c, n * c, out)
        cases += 1
        if not torch.equal(out, torch.gather(x, 1, idx[..., None].expand(-1, -1, c))):
            failures.append(f"gather {name}")
        h, d = 6, 64
        q = torch.randn(b, h, k, d, device="cuda", generator=g).to(dtype)
        kk = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
        v = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
        block = attention_block(d)
        kernel = aot.sparse_attention_ptx(name, "i64", d ** -0.5, d, arch)
        out = torch.empty_like(q)
        partial = torch.empty(b, h, triton.cdiv(k, block), k, device="cuda", dtype=torch.float32)
        kernel.compiled[(b * h, triton.cdiv(k, block), 1)](q, kk, v, idx, h, k, n, k, d, out, partial)
        want, want_mass = torch.ops.tpc.sparse_attention(q.cpu(), kk.cpu(), v.cpu(), idx.cpu(), d ** -0.5)
        tol = 5e-5 if dtype == torch.float32 else 1e-1
        cases += 1
        if not torch.allclose(out.float().cpu(), want.float(), atol=tol, rtol=tol) \
                or not torch.allclose(partial.sum(2).cpu(), want_mass, atol=1e-2, rtol=1e-2):
            failures.append(f"sparse_attention {name}")
    ROWS.append(("TensorRT plugin kernels (AOT builds)", f"{cases - len(failures)}/{cases} cases pass"
                 + (f" ({'; '.join(failures)})" if failures else ""), "all", "ok" if not failures else "fail"))


@section("gather bandwidth")
def bandwidth():
    from tpc.kernels import triton_kernels as tk

    for dtype, (b, n, k, c) in ((torch.float16, (256, 197, 138, 384)), (torch.float16, (256, 197, 138, 768)), (torch.float32, (256, 197, 138, 768))):
        x = torch.randn(b, n, c, device="cuda", dtype=dtype)
        idx = torch.sort(torch.rand(b, n, device="cuda").argsort(1)[:, :k], 1).values.contiguous()
        dense = torch.randn(b, k, c, device="cuda", dtype=dtype)
        t_gather = cuda_time(lambda: tk.gather_tokens(x, idx))
        t_copy = cuda_time(lambda: dense.clone())
        moved = 2 * b * k * c * x.element_size()
        frac = t_copy / t_gather
        ROWS.append((f"gather_tokens {str(dtype)[6:]} [{b},{n}->{k},{c}]",
                     f"{moved / t_gather / 1e9:.0f} GB/s = {frac:.2f} of copy ({moved / t_copy / 1e9:.0f} GB/s)", ">= 0.8",
                     "ok" if frac >= 0.8 else "below goal"))


@section("sparse attention")
def attention():
    from tpc.kernels import triton_kernels as tk

    for b, h, n, k, d in ((64, 6, 197, 138, 64), (64, 12, 197, 138, 64)):
        q = torch.randn(b, h, k, d, device="cuda", dtype=torch.float16)
        kk = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)
        idx = torch.sort(torch.rand(b, n, device="cuda").argsort(1)[:, :k], 1).values.contiguous()
        rows = idx[:, None, :, None].expand(-1, h, -1, d)
        ks, vs = torch.gather(kk, 2, rows).contiguous(), torch.gather(v, 2, rows).contiguous()
        t_ours = cuda_time(lambda: tk.sparse_attention(q, kk, v, idx, d ** -0.5))
        t_sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, ks, vs))
        ROWS.append((f"sparse_attention [{b},{h},{k} of {n},{d}] fp16", f"{t_ours:.3f} ms vs SDPA {t_sdpa:.3f} ms ({t_sdpa / t_ours:.2f}x)",
                     "no slower", "ok" if t_ours <= t_sdpa * 1.02 else "slower"))


def _throughput(name: str, method: str):
    import timm

    import tpc

    model = timm.create_model(name, pretrained=False).cuda().half().eval()
    example = (torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16),)
    pruned = tpc.compile(model, example, method=method, layers=[3, 6, 9], keep=0.7)
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        t_base = cuda_time(lambda: model(x), warmup=5, iters=20)
        t_pruned = cuda_time(lambda: pruned(x), warmup=5, iters=20)
    speedup = t_base / t_pruned
    flops = pruned.report.flops_before / pruned.report.flops_after
    ROWS.append((f"{name} {method} b256 fp16", f"{256 / t_base * 1e3:.0f} -> {256 / t_pruned * 1e3:.0f} img/s: {speedup:.3f}x vs FLOPs {flops:.3f}x = {speedup / flops:.2f}",
                 ">= 0.95", "ok" if speedup / flops >= 0.95 else "below goal"))


@section("DeiT throughput")
def throughput():
    for name in ("deit_small_patch16_224", "deit_base_patch16_224"):
        for method in ("topk-cls", "zero-tprune", "topk-mass"):
            _throughput(name, method)


def main() -> None:
    start = time.time()
    print(f"torch {torch.__version__}, GPU: {torch.cuda.get_device_name(0)}", flush=True)
    for fn in (kernels, plugin_kernels, bandwidth, attention, throughput):
        fn()
    width = max(len(r[0]) for r in ROWS)
    print(f"\n== tpc GPU check on {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s ==")
    for check, measured, goal, verdict in ROWS:
        print(f"{check:<{width}}  {measured}  [goal {goal}: {verdict}]" if goal else f"{check:<{width}}  {measured}")


if __name__ == "__main__":
    main()
