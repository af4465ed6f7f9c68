"""Which decoder layers attend densely, which select cache positions, which read only those.

TidalDecode (Yang et al., 2024, arXiv 2410.05076, Fig. 2): the first layers attend densely;
each *selection layer* attends densely and picks the top-k cached positions for the current
query; every later layer up to the next selection layer attends only to those positions
(position-persistent sparse attention). The paper's default: layer 2 and one middle layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpc.decode.capture import MAX_CACHE
from tpc.errors import TpcError
from tpc.registry import METHODS, Where, methods_for
from tpc.schedule import parse_layers


@dataclass(frozen=True)
class Plan:
    method: str
    layers: int  # decoder layers of the model
    selection: tuple[int, ...]  # layers that attend densely and select
    keep: int  # cached positions each sparse layer reads (the new token comes on top)

    def source(self, layer: int) -> int | None:
        """The selection layer whose positions ``layer`` reads; None for a dense layer."""
        before = [s for s in self.selection if s < layer]
        return before[-1] if before else None

    @property
    def sparse(self) -> list[int]:
        return [i for i in range(self.layers) if self.source(i) is not None and i not in self.selection]

    @property
    def dense(self) -> list[int]:
        return [i for i in range(self.layers) if i not in self.sparse]


def default_layers(layers: int) -> list[int]:
    """Layer 2 and the middle layer, as the paper (fewer for models too shallow for that)."""
    return sorted({min(2, layers - 1), layers // 2}) if layers > 1 else [0]


def decode_time(method) -> bool:
    """Whether ``method`` is a registered decode-time method (``tpc/registry.py``, ``Where.DECODE``)."""
    known = METHODS.get(method)
    return known is not None and known.applies(Where.DECODE)


def check_settings(method: str, selection=None, keep=None) -> None:
    """Refuse a malformed method, layer list or budget (before any model is loaded)."""
    if not decode_time(method):
        raise TpcError(f"method {method!r} is not a decode-time method: choose one of "
                       f"{', '.join(methods_for(Where.DECODE))}")
    if selection is not None:
        parse_layers(selection)
    _count(keep)


def make_plan(method: str, layers: int, selection=None, keep=None) -> Plan:
    check_settings(method, selection, keep)
    chosen = default_layers(layers) if selection is None else sorted(parse_layers(selection))
    for layer in chosen:
        if layer >= layers:
            raise TpcError(f"selection layer {layer} is out of range: the model has {layers} decoder layers "
                           f"(0-{layers - 1})")
    if chosen[-1] == layers - 1 and len(chosen) == 1:
        raise TpcError(f"selection at the last decoder layer ({layers - 1}) leaves no layer to read the selected "
                       "positions: choose an earlier layer")
    return Plan(method, layers, tuple(chosen), _count(keep))


def _count(keep) -> int:
    if keep is None:
        return 256
    if isinstance(keep, str):
        try:
            keep = int(keep)
        except ValueError:
            raise TpcError(f"--keep for decode-time sparse attention is a number of cached positions such as 256, "
                           f"not {keep!r}") from None
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TpcError(f"keep for decode-time sparse attention is a number of cached positions such as 256, "
                       f"not {keep!r}")
    if keep < 1:
        raise TpcError(f"keep {keep} leaves the sparse layers nothing to attend to but the new token: give a budget "
                       "of 1 or more cached positions, such as 256")
    if keep > MAX_CACHE:
        raise TpcError(f"keep {keep} is more than the {MAX_CACHE} cached positions a decode step takes: give a budget "
                       "such as 256 (a budget over the cache reads the whole cache)")
    return keep
