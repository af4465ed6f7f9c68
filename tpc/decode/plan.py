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
from tpc.recipe import decode_steps
from tpc.registry import METHODS, Where


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
    decode_steps(method, selection, keep, maximum=MAX_CACHE)


def make_plan(method: str, layers: int, selection=None, keep=None) -> Plan:
    """The steps :func:`tpc.recipe.decode_steps` parses, checked against a model of ``layers`` decoder layers."""
    steps = decode_steps(method, selection, keep, maximum=MAX_CACHE, default_layers=default_layers(layers))
    chosen = [s.layer for s in steps]
    for layer in chosen:
        if layer >= layers:
            raise TpcError(f"selection layer {layer} is out of range: the model has {layers} decoder layers "
                           f"(0-{layers - 1})")
    if chosen[-1] == layers - 1 and len(chosen) == 1:
        raise TpcError(f"selection at the last decoder layer ({layers - 1}) leaves no layer to read the selected "
                       "positions: choose an earlier layer")
    return Plan(method, layers, tuple(chosen), steps[0].keep)

