"""Pruning schedules: which layers prune, and how many tokens each keeps.

``keep`` follows ToMe's ``parse_r``: one value for every pruning layer or a list with one
value per layer. A float in (0, 1] is the fraction of the layer's non-prefix tokens kept
(EViT's keep rate, rounded up: ``ceil(ratio × n)``, at least 1, in exact integer arithmetic so a
graph with a symbolic length computes the same count); an int is the number of non-prefix
tokens kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from tpc.errors import TpcError


class Removal(int):
    """A number of tokens a layer removes (ToMe's r), as opposed to a number it keeps."""

    def __str__(self) -> str:
        return f"r={int(self)}"


KeepValue = float | int


def parse_layers(layers) -> list[int]:
    """``"3,6,9"``, ``3`` or ``[3, 6, 9]`` -> sorted list of distinct layer indices."""
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
    return sorted(out)


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


def _per_layer(value, count: int, flag: str, parse_one) -> list:
    """One value for every pruning layer, or one per layer (``"0.7"``, ``"0.7,0.5"``, ``[0.7, 0.5]``)."""
    if isinstance(value, str):
        value = [parse_one(p) for p in value.split(",") if p.strip()]
        if len(value) == 1:
            value = value[0]
    values = list(value) if isinstance(value, Sequence) else [value] * count
    if len(values) != count:
        raise TpcError(f"--{flag} has {len(values)} values for {count} pruning layers: give one value, or one per layer")
    return values


def parse_keep(keep, count: int) -> list[KeepValue]:
    """One keep value per pruning layer, validated."""
    values = _per_layer(keep, count, "keep", _parse_one)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TpcError(f"keep values are ratios in (0, 1] or token counts, got {v!r}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise TpcError(f"keep ratio {v} is outside (0, 1]: it is the fraction of tokens each layer keeps")
        if isinstance(v, int) and v <= 0:
            raise TpcError(f"keep {v} is not positive: give a ratio in (0, 1] or a count of tokens to keep (>= 1)")
    return values


def parse_removals(r, count: int) -> list[Removal]:
    """ToMe's ``r``: tokens removed per layer, one value or one per layer (``"16"``, ``[16, 8]``)."""
    def parse_one(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise TpcError(f"--r takes token counts such as 16 or 16,8,4, not {r!r}") from None

    values = _per_layer(r, count, "r", parse_one)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TpcError(f"r values are token counts >= 0, got {v!r}")
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
