"""Every pruning method on the trained CIFAR-10 ViT at three FLOPs budgets (about -15%, -30%,
-45%): top-1 and agreement with the unpruned model, plus a plot of accuracy against FLOPs.

Hyperparameters (which layers prune, and each method's own options) are chosen on the first
2,000 test images; the table reports the other 8,000. Run from the repository root:

    python benchmarks/cifar_methods.py [--plot docs/cifar_accuracy_vs_flops.png]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar_vit import DATA, MEAN, STD, model  # noqa: E402

import tpc  # noqa: E402
from tpc.dataset import Dataset, accuracy, load_dataset, predict  # noqa: E402

BUDGETS = (0.15, 0.30, 0.45)
SCHEDULES = ((1, 2), (1, 2, 3), (0, 1, 2, 3))
TUNE = 2000
OPTION_GRID = {
    "topk-cls": {"fuse": [False, True]},
    "zero-tprune": {"iterations": ["auto", 1, 10], "similarity": [0.0, 0.25, 0.5, 0.75],
                    "partition": ["sequential", "alternate"]},
    "kcenter": {}, "divprune": {}, "tome": {}, "random": {},
}


def keep_for_budget(net, inputs, layers, target: float) -> float | None:
    """The uniform keep ratio whose FLOPs reduction is closest to ``target`` (bisection)."""
    lo, hi = 0.05, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        saved = 1 - tpc.compile(net, inputs, method="random", layers=list(layers), keep=mid).report.flops_ratio
        lo, hi = (mid, hi) if saved > target else (lo, mid)
    keep = round((lo + hi) / 2, 4)
    saved = 1 - tpc.compile(net, inputs, method="random", layers=list(layers), keep=keep).report.flops_ratio
    return keep if abs(saved - target) < 0.02 else None


def option_sets(method: str):
    grid = OPTION_GRID[method]
    for values in itertools.product(*grid.values()):
        yield dict(zip(grid, values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default="docs/cifar_accuracy_vs_flops.png")
    args = parser.parse_args()
    start = time.time()
    net, inputs = model()
    data = load_dataset(DATA, (3, 32, 32))
    tune = Dataset(data.images[:TUNE], data.labels[:TUNE], "tune")
    report = Dataset(data.images[TUNE:], data.labels[TUNE:], "report")
    ref_tune = predict(net, tune, MEAN, STD)
    ref_report = predict(net, report, MEAN, STD)
    base = accuracy(ref_report, ref_report, report.labels)
    base_gflops = tpc.inspect(net, inputs).flops_before / 1e9

    rows = []
    for target in BUDGETS:
        keeps = {s: keep_for_budget(net, inputs, s, target) for s in SCHEDULES}
        for method in OPTION_GRID:
            best = None
            for layers, keep in keeps.items():
                if keep is None:
                    continue
                for options in option_sets(method):
                    try:
                        pm = tpc.compile(net, inputs, method=method, layers=list(layers), keep=keep, options=options)
                    except tpc.TpcError:
                        continue  # e.g. tome cannot merge that many tokens in one layer
                    top1 = accuracy(predict(pm, tune, MEAN, STD), ref_tune, tune.labels).top1
                    if best is None or top1 > best[0]:
                        best = (top1, layers, keep, options, pm)
            _top1, layers, keep, options, pm = best
            acc = accuracy(predict(pm, report, MEAN, STD), ref_report, report.labels)
            rows.append(dict(budget=target, method=method, layers=layers, keep=keep, options=options,
                             gflops=pm.report.flops_after / 1e9, saved=1 - pm.report.flops_ratio,
                             top1=acc.top1, agreement=acc.agreement))
            print(f"budget -{target:.0%} {method}: {rows[-1]}", file=sys.stderr)

    print(f"Unpruned: {base_gflops:.4f} GFLOPs, top-1 {100 * base.top1:.2f}% on the {len(report.images)} report images.\n")
    print("| budget | method | GFLOPs | FLOPs saved | top-1 | agreement | chosen on the first 2,000 images |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        chosen = f"layers {','.join(map(str, r['layers']))}, keep {r['keep']}"
        if r["options"]:
            chosen += ", " + ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"| -{r['budget']:.0%} | {r['method']} | {r['gflops']:.4f} | {100 * r['saved']:.1f}% | "
              f"{100 * r['top1']:.2f}% | {100 * r['agreement']:.2f}% | {chosen} |")
    from tpc.plot import accuracy_vs_flops

    accuracy_vs_flops(rows, args.plot, "CIFAR-10 ViT (8,000 test images): top-1 vs FLOPs",
                      {"gflops": base_gflops, "top1": base.top1})
    print(f"\nplot: {args.plot}; took {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
