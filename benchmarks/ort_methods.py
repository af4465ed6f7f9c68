"""Every method on DeiT-T/S/B (random weights) in ONNX Runtime on the CPU, at the Zero-TPrune
budget (about -35% FLOPs: after layers 3,6,9, keep 0.7), batch 1 and 8, pruned against
unpruned side by side. Each row is what `tpc bench` prints for that configuration:

    tpc bench deit_small_patch16_224 --random-weights --pass zero-tprune --layers 3,6,9 --keep 0.7 --batch 1,8

Run from the repository root:  python benchmarks/ort_methods.py [--models deit_tiny_patch16_224,...]
"""

from __future__ import annotations

import argparse
import sys
import time

from tpc.timing import machine_name
from tpc.commands.bench import run_bench

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
METHODS = (("topk-cls", None), ("topk-cls", {"fuse": True}), ("zero-tprune", None), ("kcenter", None),
           ("divprune", None), ("tome", None), ("topk-mass", None), ("random", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    start = time.time()
    print(f"ONNX Runtime on {machine_name()}; {args.repeats} interleaved repeats of {args.iters} runs each\n")
    print("| model | method | batch | unpruned ms | pruned ms | speedup (spread) | FLOPs ratio | of limit | inserted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for method, options in METHODS:
            result = run_bench(name, method=method, layers="3,6,9", keep="0.7", batches="1,8", iters=args.iters,
                               repeats=args.repeats, load_kwargs={"random_weights": True},
                               compile_kwargs={"options": options})
            label = method + (" fuse" if options else "")
            for r in result.rows:
                t = r.timing
                print(f"| {name} | {label} | {r.batch} | {t.base.median_ms:.1f} | {t.pruned.median_ms:.1f} | "
                      f"{t.speedup:.3f}× ({t.speedup_spread[0]:.2f}–{t.speedup_spread[1]:.2f}) | {r.flops_speedup:.3f}× | "
                      f"{r.of_limit:.3f} | {100 * r.inserted_share:.2f}% |", flush=True)
    print(f"\ntook {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
