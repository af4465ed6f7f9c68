"""Pruning schedules: which layers prune, and how many tokens each keeps or removes.

``keep`` is one value for every pruning layer or a list with one value per layer. A float in
(0, 1] is the fraction of the layer's non-prefix tokens kept (EViT's keep rate, rounded up:
``ceil(ratio × n)``, at least 1, in exact integer arithmetic so a graph with a symbolic length
computes the same count); an int is the number of non-prefix tokens kept. ``r`` is ToMe's: tokens removed per layer,
taken in every form ToMe's ``parse_r`` takes (an int, a per-layer list, an (r, inflection)
schedule); a method may bound it per layer (tome clamps it as ToMe does).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from fractions import Fraction

from tpc.errors import TpcError


class Removal(int):
    """A number of tokens a layer removes (ToMe's r), as opposed to a number it keeps."""

    def __str__(self) -> str:
        return f"r={int(self)}"


KeepValue = float | int


def parse_layers(layers) -> list[int]:
    """``"3,6,9"``, ``3`` or ``[3, 6, 9]`` -> list of distinct layer indices, in the order given (a
    per-layer keep or r is paired with them in that order, so callers sort the pairs, not the layers)."""
    if layers is None:
        raise TpcError("no pruning layers given: pass --layers, e.g. --layers 3,6,9")
    if isinstance(layers, str):
        parts = [p.strip() for p in layers.split(",") if p.strip()]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise TpcError(f"--layers takes comma-separated layer indices such as 3,6,9, not {layers!r}") from None
    elif isinstance(layers, int):
        layers = [layers]
    elif not isinstance(layers, (list, tuple, range)):
        raise TpcError(f"layers are an index or a list of indices such as [3, 6, 9], not {layers!r}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TpcError(f"layer indices are integers, got {layer!r}")
        if layer < 0:
            raise TpcError(f"layer {layer} is negative: layers count from 0")
        out.append(layer)
    if not out:
        raise TpcError("no pruning layers given: pass --layers, e.g. --layers 3,6,9")
    if len(set(out)) != len(out):
        raise TpcError(f"layer listed twice in {layers}")
    return out


def _parse_one(text: str) -> KeepValue:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise TpcError(f"--keep takes ratios such as 0.7 or token counts such as 120, not {text!r}") from None


def _per_layer(value, count: int, flag: str, parse_one, what: str = "pruning layers") -> list:
    """One value for every pruning layer, or one per layer (``"0.7"``, ``"0.7,0.5"``, ``[0.7, 0.5]``)."""
    if isinstance(value, str):
        value = [parse_one(p) for p in value.split(",") if p.strip()]
        if len(value) == 1:
            value = value[0]
    values = list(value) if isinstance(value, Sequence) else [value] * count
    if len(values) != count:
        raise TpcError(f"--{flag} has {len(values)} values for {count} {what}: give one value, or one per layer")
    return values


def parse_keep(keep, count: int, zero: bool = False, what: str = "pruning layers") -> list[KeepValue]:
    """One keep value per pruning layer, validated. ``zero``: keep 0 (``0``, ``0.0``, ``"0"``) is
    allowed and read as the count 0 (a VLM stage that drops every visual token left)."""
    values = _per_layer(keep, count, "keep", _parse_one, what)
    if zero:
        values = [0 if not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0 else v for v in values]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TpcError(f"keep values are ratios in (0, 1] or token counts, got {v!r}")
        if zero and v == 0:
            continue
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise TpcError(f"keep ratio {v} is outside (0, 1]: it is the fraction of tokens each layer keeps")
        if isinstance(v, int) and v <= 0:
            raise TpcError(f"keep {v} is not positive: give a ratio in (0, 1] or a count of tokens to keep (>= 1)")
    return values


def parse_budget(keep, maximum: int, default: int) -> int | float:
    """A decode-time budget: the number of cached positions each sparse layer reads (an int, 1 to
    ``maximum``; ``default`` when not given) or a ratio of the cache in (0, 1] (a float: ceil(ratio × L)
    of the L cached positions at each step); ``"256"``/``"0.25"`` as the CLI gives it."""
    if keep is None:
        return default
    given = keep
    if isinstance(keep, str):
        try:
            keep = float(keep) if any(c in keep.lower() for c in ".en") else int(keep)
        except ValueError:
            raise TpcError(f"--keep for decode-time sparse attention is a number of cached positions such as {default} "
                           f"or a ratio of the cache in (0, 1] such as 0.25, not {keep!r}") from None
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TpcError(f"keep for decode-time sparse attention is a number of cached positions such as {default} "
                       f"or a ratio of the cache in (0, 1] such as 0.25, not {given!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:  # nan fails both comparisons
            raise TpcError(f"keep ratio {given!r} is outside (0, 1]: a ratio is the share of the cache each sparse "
                           f"layer reads, such as 0.25 (or give a number of cached positions such as {default})")
        return keep
    if keep < 1:
        raise TpcError(f"keep {keep} leaves the sparse layers nothing to attend to but the new token: give a budget "
                       f"of 1 or more cached positions, such as {default}, or a ratio of the cache in (0, 1]")
    if keep > maximum:
        raise TpcError(f"keep {keep} is more than the {maximum} cached positions a decode step takes: give a budget "
                       f"such as {default} (a budget over the cache reads the whole cache)")
    return keep


def parse_kv_budget(keep, maximum: int, default: int) -> int | float:
    """A compressed KV cache's budget per layer: cached positions (an int, 1 to ``maximum``) or a
    ratio of the prompt in (0, 1]; ``default`` positions when not given; ``"256"``/``"0.2"`` as the CLI gives it."""
    if keep is None:
        return default
    given = keep
    if isinstance(keep, str):
        try:
            keep = float(keep) if any(c in keep for c in ".eE") else int(keep)
        except ValueError:
            keep = None
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 \
            or isinstance(keep, float) and (keep > 1 or math.isnan(keep)):
        raise TpcError(f"keep for a compressed KV cache is a budget of cached positions per layer (1 or more, such as "
                       f"{default}) or a ratio of the prompt in (0, 1] (such as 0.2), not {given!r}")
    if isinstance(keep, int) and keep > maximum:
        raise TpcError(f"keep {keep} is more than the {maximum} cached positions a decode step takes: give a budget "
                       f"such as {default}")
    return keep


SEED_RANGE = 2**32  # as numpy's; the random method adds the layer index, within torch's int64


def check_seed(seed, flag: str = "--seed") -> int:
    """``seed`` when it is an integer from 0 to 2**32 - 1 (a generator takes it, whatever the layer added)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_RANGE:
        raise TpcError(f"{flag} is an integer from 0 to {SEED_RANGE - 1}, not {seed!r}")
    return seed


RValue = int | list | tuple


def read_r(r) -> RValue:
    """ToMe's ``r``, validated: an int (every layer), a list (one per layer), or a tuple
    ``(r, inflection)`` (ToMe's schedule). Strings as on the command line: ``"16"``,
    ``"16,8,4"`` or ``"[16,8,4]"``, ``"(16,-0.5)"``."""
    form = "--r takes 16 (every layer), 16,8,4 (one per layer) or (16,-0.5) (ToMe's r, inflection schedule)"
    if isinstance(r, str):
        text = r.strip()
        schedule = text.startswith("(") and text.endswith(")")
        listed = text.startswith("[") and text.endswith("]")
        body = text[1:-1] if schedule or listed else text
        parts = [p.strip() for p in body.split(",")] if body.strip() else []
        try:
            if any(not p or p[0] in "([" or p[-1] in ")]" for p in parts):  # '16,,8', '(16,', '[16'
                raise ValueError
            if schedule:
                if len(parts) != 2:
                    raise ValueError
                r = (int(parts[0]), float(parts[1]))
            else:
                values = [int(p) for p in parts]
                r = values[0] if len(values) == 1 and not listed else values
        except ValueError:
            raise TpcError(f"{form}, not {text!r}") from None
    if isinstance(r, tuple):
        if len(r) != 2 or isinstance(r[1], bool) or not isinstance(r[1], (int, float)) or not math.isfinite(r[1]):
            raise TpcError(f"a tuple r is ToMe's (r, inflection) schedule, e.g. (16, -0.5), not {r!r}; "
                           "give a list for one r per layer")
        _check_r(r[0])
        return (int(r[0]), float(r[1]))
    if isinstance(r, Sequence):
        values = list(r)
        if not values:
            raise TpcError(f"{form}: the list is empty")
        for v in values:
            _check_r(v)
        return values
    _check_r(r)
    return r


def _check_r(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TpcError(f"r values are token counts >= 0, got {v!r}")


def tome_schedule(r: int, inflection: float, count: int) -> list[int]:
    """ToMe's ``parse_r`` schedule: r per layer on a line through r at the middle layer, with
    slope set by ``inflection`` (-1: decreasing, 0: constant, +1: increasing); a value below 0
    means no merging at that layer, as in ToMe."""
    low = int(r * (1.0 - inflection))
    step = (2 * r - 2 * low) / max(count - 1, 1)
    return [max(0, int(low + step * i)) for i in range(count)]


def parse_removals(r, count: int, pad: bool = False) -> list[Removal]:
    """ToMe's ``r`` as tokens removed at each of ``count`` pruning layers. A list shorter than
    the layers is padded with 0 when ``pad`` (every layer was chosen by default, as in ToMe);
    otherwise it must have one value per layer."""
    r = read_r(r)
    if isinstance(r, tuple):
        values = tome_schedule(r[0], r[1], count)
    elif isinstance(r, list):
        values = r + [0] * (count - len(r)) if pad else r
        if len(values) != count:
            where = f"the model's {count} layers" if pad else f"{count} pruning layers"
            raise TpcError(f"--r has {len(r)} values for {where}: give one value, one per layer, or a schedule")
    else:
        values = [r] * count
    return [Removal(v) for v in values]


RATIO_DENOMINATOR = 10**6  # ratios are read to six digits, so ratio × length stays far from int64 overflow


def ratio_fraction(keep: float) -> Fraction:
    """The keep ratio as an exact fraction (0.7 -> 7/10), the form the graph computes with."""
    return Fraction(keep).limit_denominator(RATIO_DENOMINATOR)


def ratio_count(keep: float, available):
    """ceil(keep × available) in integer arithmetic; ``available`` may be a symbolic size.

    At least 1 for available >= 1 (keep > 0), at most ``available`` (keep <= 1).
    """
    f = ratio_fraction(keep)
    return (available * f.numerator + (f.denominator - 1)) // f.denominator


def kept_count(keep: KeepValue, tokens: int, prefix: int, layer: int) -> int:
    """Non-prefix tokens kept by a layer that sees ``tokens`` tokens, ``prefix`` of them prefix."""
    available = tokens - prefix
    if isinstance(keep, Removal):
        if keep >= available:
            raise TpcError(f"layer {layer} sees {available} non-prefix tokens and cannot remove {int(keep)}")
        return available - keep
    if isinstance(keep, float):
        return max(1, ratio_count(keep, available))
    if keep > available:
        raise TpcError(f"layer {layer} sees {available} non-prefix tokens and cannot keep {keep}")
    return keep
