"""``tpc visualize``: the patches each pruning layer keeps, drawn over the image (:mod:`tpc.visualize`)."""

from __future__ import annotations

from tpc.commands.arguments import load_kwargs, prune_kwargs
from tpc.visualize import run_visualize


def run(args) -> int:
    result = run_visualize(args.model, args.image, args.output, method=args.method, layers=args.layers, keep=args.keep,
                           mean=args.mean, std=args.std, load_kwargs=load_kwargs(args),
                           compile_kwargs=prune_kwargs(args))
    counts = ", ".join(f"layer {layer}: {n} patches" for layer, n in zip(result.layers, result.kept))
    print(f"wrote {result.path}: {result.grid[0]}x{result.grid[1]} patches of {result.patch} px; kept {counts}")
    return 0
