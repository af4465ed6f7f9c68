"""Which decoder layers attend densely, which select cache positions, which read only those.

TidalDecode (Yang et al., 2024, arXiv 2410.05076, Fig. 2): the first layers attend densely;
each *selection layer* attends densely and picks the top-k cached positions for the current
query; every later layer up to the next selection layer attends only to those positions
(position-persistent sparse attention). The paper's default: layer 2 and one middle layer.

Quest (Tang et al., ICML 2024, arXiv 2406.10774): every *quest layer* selects the pages of
its own cache for its own query and reads only those; the other layers attend densely (the
paper's default: every layer from layer 2 on is a quest layer, layers 0 and 1 dense). A plan
with a ``page`` size is such a plan: its selection layers are its sparse layers.

DHSA (Xiong et al., NeurIPS 2025, arXiv 2510.24606) is planned as Quest is: every *dhsa layer*
selects, for its own query, the positions of the chunks of its own cache it scores highest;
layers 0 and 1 attend densely by default (the paper names none; tpc keeps Quest's). A plan with
``chunk`` settings (min and max chunk length, the boundary threshold) is such a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from tpc.decode.capture import MAX_CACHE
from tpc.errors import TpcError
from tpc.recipe import decode_steps
from tpc.registry import METHODS, Where
from tpc.schedule import RATIO_DENOMINATOR, ratio_fraction


@dataclass(frozen=True)
class Plan:
    method: str
    layers: int  # decoder layers of the model
    selection: tuple[int, ...]  # layers that attend densely and select
    keep: int | float  # cached positions each sparse layer reads (the new token comes on top), or a ratio of the cache
    page: int | None = None  # Quest: positions per page; each selection layer selects its own pages
    chunk: tuple[int, int, float] | None = None  # DHSA: (min_chunk, max_chunk, threshold); each layer selects its own
    correct: int = 0  # TidalDecode: every `correct` new tokens one dense pass rewrites their KV (0: never)

    @property
    def own(self) -> bool:
        """Whether each sparse layer selects its own positions (quest, dhsa), not a selection layer's (tidal)."""
        return self.page is not None or self.chunk is not None

    def source(self, layer: int) -> int | None:
        """The selection layer whose positions ``layer`` reads; None for a dense layer."""
        if self.own:
            return layer if layer in self.selection else None
        before = [s for s in self.selection if s < layer]
        return before[-1] if before else None

    @property
    def sparse(self) -> list[int]:
        return [i for i in range(self.layers) if self.source(i) is not None
                and (self.own or i not in self.selection)]

    @property
    def pages(self) -> int | None:
        """Pages a quest layer reads (the budget rounded up to whole pages); None without pages or for a ratio
        (whose pages depend on the cache length: :func:`selected_count`)."""
        return None if self.page is None or isinstance(self.keep, float) else -(-self.keep // self.page)

    def positions(self, cached: int) -> int:
        return sparse_positions(self.keep, self.page, cached)


def selected_count(keep: int | float, cached, page: int | None = None):
    """What a sparse layer selects at ``cached`` cached positions: positions (``page`` None) or pages of
    ``page`` positions. An int budget is that many positions (quest: ceil(keep / page) pages; a count over
    the cache is cut by the selection op); a ratio is ceil(ratio × cached) positions, at least 1 (quest:
    the pages holding that many). ``cached`` may be a symbolic size (or a graph node's value): a ratio is
    computed in integer arithmetic from its fraction, so torch.export adds no guard on the cache length."""
    if isinstance(keep, float):
        n, d = ratio_parts(keep)
        keep = (cached * n + d - 1) // d
    return keep if page is None else (keep + page - 1) // page


def ratio_parts(keep: float) -> tuple[int, int]:
    """(n, d): the ratio as the exact fraction n / d the graph computes with (at least 1e-6, so that
    ceil(ratio × L) is at least 1 for a ratio too small for six digits)."""
    f = max(ratio_fraction(keep), Fraction(1, RATIO_DENOMINATOR))
    return f.numerator, f.denominator


def sparse_positions(keep: int | float, page: int | None, cached: int) -> int:
    """Cache positions a sparse layer reads at ``cached`` cached positions (the new token not counted):
    ``keep`` of them (a ratio: ceil(keep × cached)), or with pages every position of the pages read (the
    partial last page counted whole: its positions past the cache are gathered, and masked)."""
    if page is None:
        return min(selected_count(keep, cached), cached)
    return min(selected_count(keep, cached, page), -(-cached // page)) * page


def describe_budget(keep: int | float, page: int | None = None) -> str:
    """The budget in words: ``256 positions``, ``16 pages of 16 positions``, ``a ratio 0.25 of the cache``."""
    if isinstance(keep, float):
        return f"a ratio {keep:g} of the cache" + (f" in pages of {page} positions" if page else "")
    return f"{keep} positions" if page is None else f"{-(-keep // page)} pages of {page} positions"


def default_layers(layers: int) -> list[int]:
    """Layer 2 and the middle layer, as the paper (fewer for models too shallow for that)."""
    return sorted({min(2, layers - 1), layers // 2}) if layers > 1 else [0]


def quest_layers(layers: int) -> list[int]:
    """Every layer from layer 2 on, as Quest (its first two layers attend densely); the last layer for
    models too shallow for that."""
    return list(range(min(2, layers - 1), layers))


def decode_time(method) -> bool:
    """Whether ``method`` is a registered decode-time method (``tpc/registry.py``, ``Where.DECODE``)."""
    known = METHODS.get(method)
    return known is not None and known.applies(Where.DECODE)


def check_settings(method: str, selection=None, keep=None, options=None) -> dict:
    """Refuse a malformed method, layer list, budget or option (before any model is loaded); the
    method's options, resolved."""
    decode_steps(method, selection, keep, maximum=MAX_CACHE)
    resolved = METHODS[method].resolve_options(options)
    page = resolved.get("page")
    if page is not None and page > MAX_CACHE:  # a page is read whole: one over the cache a step takes cannot be
        raise TpcError(f"option page {page} is more than the {MAX_CACHE} cached positions a decode step takes: "
                       "give a page such as 16")
    for name in ("min_chunk", "max_chunk"):
        if resolved.get(name) is not None and resolved[name] > MAX_CACHE:
            raise TpcError(f"option {name} {resolved[name]} is more than the {MAX_CACHE} cached positions a decode "
                           "step takes: give a chunk length such as 16")
    return resolved


def make_plan(method: str, layers: int, selection=None, keep=None, options=None) -> Plan:
    """The steps :func:`tpc.recipe.decode_steps` parses, checked against a model of ``layers`` decoder layers.
    A method with a ``page`` option (quest) selects pages at each of its layers (default: layer 2 on), one with
    chunk options (dhsa) the positions of its best chunks at each of its layers (default: layer 2 on)."""
    resolved = check_settings(method, selection, keep, options)
    page = resolved.get("page")
    chunk = (resolved["min_chunk"], resolved["max_chunk"], float(resolved["threshold"])) \
        if "max_chunk" in resolved else None
    own = page is not None or chunk is not None
    defaults = quest_layers(layers) if own else default_layers(layers)
    steps = decode_steps(method, selection, keep, maximum=MAX_CACHE, default_layers=defaults)
    chosen = [s.layer for s in steps]
    for layer in chosen:
        if layer >= layers:
            raise TpcError(f"{'sparse' if own else 'selection'} layer {layer} is out of range: the model has {layers} "
                           f"decoder layers (0-{layers - 1})")
    if not own and chosen[-1] == layers - 1 and len(chosen) == 1:
        raise TpcError(f"selection at the last decoder layer ({layers - 1}) leaves no layer to read the selected "
                       "positions: choose an earlier layer")
    return Plan(method, layers, tuple(chosen), steps[0].keep, page, chunk, resolved.get("correct", 0))

