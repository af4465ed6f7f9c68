"""``tpc passes``: every pruning method, its paper, capabilities and options."""

from __future__ import annotations

from tpc.registry import METHODS


def run(args) -> int:
    width = max(len(n) for n in METHODS)
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.summary}\n{'':<{width}}  paper: {m.paper}")
        print(f"{'':<{width}}  {m.capabilities()}")
        if m.options:
            print(f"{'':<{width}}  options: " + ", ".join(f"{k}={v!r}" for k, v in m.options.items()))
    return 0
