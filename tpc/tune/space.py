"""The recipes ``tpc tune`` tries: a small grid per family, interleaved so that any prefix of
the list covers every family (a time budget cuts the list short, never a whole family), and
each family's grid is taken midpoint-first in order of estimated FLOPs, so a short prefix
already spans the range from light to heavy pruning.

Families, for a model of D attention layers with N tokens (P of them prefix):

- *single method, fixed schedule* (EViT's form): a gather method at every layer from s to
  D - 1, keeping the same ratio at each (0.9 ... 0.5);
- *ToMe*: r tokens merged at every layer from s (ToMe's form), r a sixteenth to a quarter of
  the non-prefix tokens in steps of a thirty-second, either constant or on ToMe's decreasing
  schedule (``(r, -0.5)``: 1.5·r at the first layer down to 0.5·r at the last, merging most
  where the most tokens are redundant), capped where bipartite matching runs out of tokens;
- *mixed*: ToMe's r in layers before t, then an importance method keeping a ratio from t on
  (merge the redundant background early, drop the unimportant tokens late), with gentle keeps
  (0.9 … 0.6) since the merges already removed the redundant tokens.
"""

from __future__ import annotations

from tpc.recipe import Step
from tpc.registry import METHODS, Kind, PruneMethod, Where, get_method
from tpc.schedule import kept_count, tome_schedule

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
TOME_FRACTIONS = tuple(k / 32 for k in range(2, 9))  # a sixteenth to a quarter of the tokens, per layer
TOME_INFLECTIONS = (0.0, -0.5)  # ToMe's constant and decreasing schedules
MIXED_TOME_FRACTIONS = (1 / 8, 3 / 16)
MIXED_KEEPS = (0.9, 0.8, 0.7, 0.6)


def starts(depth: int) -> list[int]:
    """First pruning layers tried: every layer of a shallow model, a few of a deep one."""
    if depth <= 6:
        return list(range(depth))
    return sorted({1, depth // 4, depth // 3, depth // 2, (2 * depth) // 3})


def searched_by_default() -> list[str]:
    """The encoder methods ``tpc tune`` searches unless told: the selecting ones, then the merging
    ones, in registry order (baselines such as random are never searched)."""
    encoder = [m for m in METHODS.values() if m.applies(Where.ENCODER) and not m.baseline]
    return [m.name for kind in (Kind.SELECT, Kind.MERGE) for m in encoder if m.kind is kind]


def _merge_steps(merge: PruneMethod, layers, r: int, tokens: int, prefix: int,
                 inflection: float = 0.0) -> list[Step] | None:
    layers = list(layers)
    steps = []
    for layer, r_layer in zip(layers, tome_schedule(r, inflection, len(layers))):
        if r_layer > merge.max_removal(tokens, prefix) or tokens - prefix - r_layer < 1:
            return None
        if r_layer:
            steps.append(Step(layer, merge.name, r=r_layer))
        tokens -= r_layer
    return steps or None


def _gather_steps(method: str, layers, keep: float) -> list[Step]:
    return [Step(layer, method, keep=keep) for layer in layers]


def candidates(depth: int, tokens: int, prefix: int, methods: list[str]) -> list[list[Step]]:
    """Every recipe of the grid for these methods, families interleaved."""
    families: list[list[list[Step]]] = []
    chosen = [get_method(m, Where.ENCODER) for m in methods]
    for method in [m.name for m in chosen if m.kind is Kind.SELECT]:
        families.append([_gather_steps(method, range(s, depth), keep) for keep in KEEPS for s in starts(depth)])
    # the mixed family's tail: selecting methods that read importance off one attention map, in registry order
    importance = [m.name for m in METHODS.values() if m in chosen and m.kind is Kind.SELECT
                  and m.criterion == "attention"]
    for merge in [m for m in chosen if m.kind is Kind.MERGE]:
        rs = sorted({max(1, round(f * (tokens - prefix))) for f in TOME_FRACTIONS})
        family = [_merge_steps(merge, range(s, depth), r, tokens, prefix, inflection)
                  for r in rs for s in starts(depth)[:2] for inflection in TOME_INFLECTIONS]
        families.append([f for f in family if f])
        mixed = []
        for method in importance:
            for t in starts(depth)[1:]:
                for r in sorted({max(1, round(f * (tokens - prefix))) for f in MIXED_TOME_FRACTIONS}):
                    head = _merge_steps(merge, range(t), r, tokens, prefix)
                    if head is None:
                        continue
                    for keep in MIXED_KEEPS:
                        mixed.append(head + _gather_steps(method, range(t, depth), keep))
        families.append(mixed)
    for i, family in enumerate(families):  # midpoints first: a list cut short still spans the FLOPs range
        families[i] = spread(sorted(family, key=lambda steps: flops_estimate(steps, depth, tokens, prefix)))
    out, seen = [], set()
    for i in range(max((len(f) for f in families), default=0)):
        for family in families:
            if i < len(family):
                key = tuple(map(str, family[i]))
                if key not in seen:
                    seen.add(key)
                    out.append(family[i])
    return out


def flops_estimate(steps: list[Step], depth: int, tokens: int, prefix: int) -> float:
    """Rough share of the unpruned compute: a layer's attention at the tokens it sees, its MLP after the step."""
    at = {s.layer: s for s in steps}
    full, cost = tokens, 0.0
    for layer in range(depth):
        seen = tokens
        if layer in at:
            tokens = prefix + kept_count(at[layer].amount, tokens, prefix, layer)
        cost += 0.4 * seen + 0.6 * tokens
    return cost / (depth * full)


def spread(items: list) -> list:
    """Sorted items in midpoint-first order (middle, then the middles of each half, …)."""
    out, spans = [], [(0, len(items) - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if lo <= hi:
            mid = (lo + hi) // 2
            out.append(items[mid])
            spans += [(lo, mid - 1), (mid + 1, hi)]
    return out


def family_of(steps: list[Step]) -> str:
    """``tome``, ``topk-cls``, or ``tome+topk-cls`` for a mixed recipe."""
    return "+".join(dict.fromkeys(s.method for s in steps))
