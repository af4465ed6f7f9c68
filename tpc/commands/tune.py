"""``tpc tune``: the fastest recipe within an accuracy budget on the user's data (:mod:`tpc.tune`)."""

from __future__ import annotations

from tpc.commands.arguments import load_kwargs
from tpc.tune import run_tune


def run(args) -> int:
    result = run_tune(args.model, args.data, max_drop=args.max_drop, target=args.target, backend=args.backend,
                      batch=args.batch, time_budget=args.time, metric=args.metric, max_flops=args.max_flops,
                      check_split=args.check_split, plot=args.plot, output=args.output, methods=args.methods,
                      mean=args.mean, std=args.std, after=args.after, seed=args.seed, load_kwargs=load_kwargs(args),
                      progress=args.progress, confidence=args.confidence)
    print(result.table())
    if result.best is not None:
        return 0
    return 130 if result.search["interrupted"] else 1  # Ctrl-C before a pick: as an interrupted command exits
