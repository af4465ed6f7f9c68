"""The recipes ``tpc tune`` tries: a small grid per family, interleaved so that any prefix of
the list covers every family (a time budget cuts the list short, never a whole family), and
each family's grid is shuffled once (fixed seed) so a short prefix spans layers and budgets.

Families, for a model of D attention layers with N tokens (P of them prefix):

- *single method, fixed schedule* (EViT's form): a gather method at every layer from s to
  D - 1, keeping the same ratio at each (0.9 ... 0.5);
- *ToMe*: r tokens merged at every layer from s (ToMe's form), r a sixteenth to a quarter of
  the non-prefix tokens, capped where bipartite matching runs out of tokens;
- *mixed*: ToMe's r in layers before t, then an importance method keeping a ratio from t on
  (merge the redundant background early, drop the unimportant tokens late).
"""

from __future__ import annotations

import random

from tpc.passes.prune_methods import tome_max_merges
from tpc.recipe import Step

GATHER_METHODS = ("topk-cls", "topk-mass", "zero-tprune", "kcenter", "divprune")
IMPORTANCE_METHODS = ("topk-cls", "topk-mass")
KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
TOME_FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4)
MIXED_KEEPS = (0.8, 0.6)


def starts(depth: int) -> list[int]:
    """First pruning layers tried: every layer of a shallow model, a few of a deep one."""
    if depth <= 6:
        return list(range(depth))
    return sorted({1, depth // 4, depth // 3, depth // 2, (2 * depth) // 3})


def _tome_steps(layers, r: int, tokens: int, prefix: int) -> list[Step] | None:
    steps = []
    for layer in layers:
        if r > tome_max_merges(tokens, prefix) or tokens - prefix - r < 1:
            return None
        steps.append(Step(layer, "tome", r=r))
        tokens -= r
    return steps


def _gather_steps(method: str, layers, keep: float) -> list[Step]:
    return [Step(layer, method, keep=keep) for layer in layers]


def candidates(depth: int, tokens: int, prefix: int, methods: list[str]) -> list[list[Step]]:
    """Every recipe of the grid for these methods, families interleaved."""
    families: list[list[list[Step]]] = []
    for method in [m for m in methods if m not in ("tome",)]:
        families.append([_gather_steps(method, range(s, depth), keep) for keep in KEEPS for s in starts(depth)])
    if "tome" in methods:
        rs = sorted({max(1, round(f * (tokens - prefix))) for f in TOME_FRACTIONS})
        family = [_tome_steps(range(s, depth), r, tokens, prefix) for r in rs for s in starts(depth)[:2]]
        families.append([f for f in family if f])
        mixed = []
        for method in [m for m in IMPORTANCE_METHODS if m in methods]:
            for t in starts(depth)[1:]:
                for r in rs[1:3]:
                    head = _tome_steps(range(t), r, tokens, prefix)
                    if head is None:
                        continue
                    for keep in MIXED_KEEPS:
                        mixed.append(head + _gather_steps(method, range(t, depth), keep))
        families.append(mixed)
    for family in families:  # a fixed shuffle: a list cut short still spans layers and budgets
        random.Random(len(family)).shuffle(family)
    out, seen = [], set()
    for i in range(max((len(f) for f in families), default=0)):
        for family in families:
            if i < len(family):
                key = tuple(map(str, family[i]))
                if key not in seen:
                    seen.add(key)
                    out.append(family[i])
    return out


def family_of(steps: list[Step]) -> str:
    """``tome``, ``topk-cls``, or ``tome+topk-cls`` for a mixed recipe."""
    return "+".join(dict.fromkeys(s.method for s in steps))
