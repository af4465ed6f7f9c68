"""Every pruning method tpc knows, with what it is and where it applies.

A :class:`PruneMethod` is one entry: its paper, whether it selects or merges tokens, the places
in a model it prunes (:class:`Where`), what it needs (a [CLS] token, a fixed sequence length),
whether it takes an attention mask, and its options with their defaults. Its implementation
for each place is named as ``"module:function"`` and imported on first use, so this module
stays at the bottom of the package: the CLI, the tune search space, recipe checks and the
tests read the capabilities here without importing a pass, and never test a method's name.

Adding a method is one :func:`register` call (an entry with its implementation per place)
plus its ``tpc::`` op(s); ``tpc passes`` lists it and every test that runs "every method
that applies here" runs it.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tpc.errors import TpcError
from tpc.methods.tome import max_merges


class Kind(enum.Enum):
    SELECT = "select"  # keeps a subset of the tokens (drops the rest)
    MERGE = "merge"  # combines tokens into fewer (sizes carried, proportional attention)


class Where(enum.Enum):
    """A place in a model where a method prunes; each takes its own implementation signature."""

    ENCODER = "encoder tokens"  # an encoder's token stream after a layer (InsertPrune)
    VISUAL_BEFORE_LM = "visual tokens before the LM"  # a VLM's visual tokens entering the language model
    VISUAL_IN_LM = "visual tokens inside the LM"  # a VLM's visual tokens after a decoder layer (the prefill)
    DECODE = "decode-time"  # the cache positions a decode step reads (sparse attention)
    KV_EVICTION = "kv-eviction"  # the cache positions a decoder keeps (eviction)


VISUAL = (Where.VISUAL_BEFORE_LM, Where.VISUAL_IN_LM)


def _number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise TpcError(f"option {name} must be a number in [{low}, {high}], not {value!r}")


def check_topk_cls(o: dict) -> None:
    if not isinstance(o["fuse"], bool):
        raise TpcError(f"option fuse must be True or False, not {o['fuse']!r}")


def check_zero_tprune(o: dict) -> None:
    it = o["iterations"]
    if it != "auto" and (isinstance(it, bool) or not isinstance(it, int) or it < 0):
        raise TpcError(f"option iterations must be 'auto' or an integer >= 0, not {it!r}")
    _number("v_min", o["v_min"], 0.0, float("inf"))
    _number("v_max", o["v_max"], o["v_min"], float("inf"))
    if o["similarity"] != "auto":
        _number("similarity", o["similarity"], 0.0, 1.0)
    if o["partition"] not in ("sequential", "alternate"):
        raise TpcError(f"option partition must be 'sequential' or 'alternate', not {o['partition']!r}")


def check_windows(o: dict) -> None:
    """KV-eviction windows, Quest's page and TidalDecode's correction interval are counts of positions (an odd
    count for a pooling kernel)."""
    for name, value in o.items():
        if value is None and name == "recent":
            continue
        least = 0 if name in ("sinks", "correct") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TpcError(f"option {name} is a number of positions ({least} or more), not {value!r}")
        if name == "kernel" and value % 2 == 0:
            raise TpcError(f"option kernel is the odd width of SnapKV's pooling (such as 5), not {value}")


def check_chunks(o: dict) -> None:
    """DHSA's chunk lengths are counts of positions (max_chunk at least min_chunk); its boundary threshold a
    cosine similarity."""
    for name in ("min_chunk", "max_chunk"):
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TpcError(f"option {name} is a number of positions (1 or more), not {value!r}")
    if o["max_chunk"] < o["min_chunk"]:
        raise TpcError(f"option max_chunk ({o['max_chunk']}) is less than min_chunk ({o['min_chunk']}): give "
                       "max_chunk >= min_chunk")
    _number("threshold", o["threshold"], -1.0, 1.0)


@dataclass(frozen=True)
class PruneMethod:
    """One method. ``impl`` maps each place it applies to its implementation (a callable, or
    ``"module:function"`` imported on first use); the places are exactly ``impl``'s keys.

    ``criterion`` is what ranks the tokens: ``attention`` (read from one attention map),
    ``graph`` (an iterated score over the attention graph), ``diversity``, ``similarity``
    (merging the most alike), ``random`` (a baseline, never searched by ``tpc tune``).
    """

    name: str
    paper: str
    summary: str
    kind: Kind
    criterion: str
    impl: Mapping[Where, str | Callable]
    needs_cls: bool = False  # ranks by a [CLS] token's attention (a model without one is refused)
    takes_mask: bool = True  # handles an attention mask (padding); False: refused on masked attention
    fixed_length: bool = False  # needs the sequence length fixed at compile time
    options: dict = field(default_factory=dict)
    check: Callable[[dict], None] | None = None
    # ToMe's conventions: r clamped per layer to max_removal(tokens, prefix); every layer when none are named
    max_removal: Callable[[int, int], int] | None = None
    every_layer_by_default: bool = False

    @property
    def where(self) -> frozenset[Where]:
        return frozenset(self.impl)

    @property
    def baseline(self) -> bool:
        return self.criterion == "random"

    def applies(self, *places: Where) -> bool:
        """Whether the method prunes at any of ``places``."""
        return any(p in self.impl for p in places)

    def implementation(self, where: Where) -> Callable:
        if where not in self.impl:
            raise TpcError(f"{self.name} does not prune {where.value}: it prunes "
                           f"{', '.join(w.value for w in Where if w in self.impl)}")
        impl = self.impl[where]
        if isinstance(impl, str):
            module, _, attr = impl.partition(":")
            impl = getattr(importlib.import_module(module), attr)
        return impl

    def resolve_options(self, given: dict | None) -> dict:
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k} (default {v!r})" for k, v in self.options.items()) or "none"
            raise TpcError(f"{self.name} has no option {unknown[0]!r}; its options: {valid}")
        options = {**self.options, **given}
        if self.check is not None:
            self.check(options)
        return options

    def capabilities(self) -> str:
        """One line for ``tpc passes``: kind, places, needs."""
        needs = [w for w, on in (("a [CLS] token", self.needs_cls), ("a fixed length", self.fixed_length)) if on]
        return (f"{self.kind.value}; {', '.join(w.value for w in Where if w in self.impl)}"
                + (f"; needs {' and '.join(needs)}" if needs else "")
                + ("" if self.takes_mask else "; no attention mask"))


METHODS: dict[str, PruneMethod] = {}
DEFAULT_METHOD = "topk-cls"  # what tpc.compile and every command prune with when no method is named


def register(method: PruneMethod) -> PruneMethod:
    """Add ``method`` (a name already taken is refused); returns it."""
    if method.name in METHODS:
        raise TpcError(f"a pruning method named {method.name!r} is already registered")
    if not method.impl:
        raise TpcError(f"pruning method {method.name!r} applies nowhere: give its implementation per place (impl)")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str, where: Where | None = None) -> PruneMethod:
    """The method called ``name``; with ``where``, refused unless it prunes there."""
    if name not in METHODS:
        raise TpcError(f"unknown pruning method {name!r}: choose one of {', '.join(METHODS)} (see `tpc passes`)")
    method = METHODS[name]
    if where is not None and where not in method.impl:
        others = ", ".join(methods_for(where))
        raise TpcError(f"{name} does not prune {where.value}: it prunes "
                       f"{', '.join(w.value for w in Where if w in method.impl)}; for {where.value} use {others}")
    return method


def methods_for(*places: Where) -> list[str]:
    """The names of the methods that prune at any of ``places``, in registry order."""
    return [m.name for m in METHODS.values() if m.applies(*places)]


_ENC = "tpc.passes.prune_methods:"
_KV = "tpc.decode.eviction:"
_VLM = "tpc.vlm.prune_visual:"

for _m in (
    PruneMethod("topk-cls", "EViT (Liang et al., ICLR 2022); VTC-CLS (Wang et al., 2024, arXiv 2412.05819)",
                "keep the tokens [CLS] attends to most (head-mean attention); fuse=True appends EViT's fused token; "
                "in a VLM, the vision tower's [CLS] attention at one or several layers (summed) ranks the visual "
                "tokens (VTC-CLS); a tower without [CLS]: the attention each patch receives",
                Kind.SELECT, "attention", {Where.ENCODER: _ENC + "build_topk_cls",
                                           Where.VISUAL_BEFORE_LM: _VLM + "choose_topk_cls"},
                needs_cls=True, options={"fuse": False}, check=check_topk_cls),
    PruneMethod("topk-mass", "PoWER-BERT (Goyal et al., ICML 2020, arXiv 2001.08950); LTP (Kim et al., KDD 2022)",
                "keep the tokens that receive the most attention (column sums of the attention, head mean); "
                "no [CLS] needed; on SDPA layers the scores come from the layer's own attention",
                Kind.SELECT, "attention", {Where.ENCODER: _ENC + "build_topk_mass"}),
    PruneMethod("zero-tprune", "Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024, arXiv 2305.17328)",
                "Weighted PageRank importance over the attention graph (VHF, EIR), I' -> S -> I stages",
                Kind.SELECT, "graph", {Where.ENCODER: _ENC + "build_zero_tprune"},
                options={"iterations": "auto", "v_min": 0.01, "v_max": 0.7, "similarity": "auto",
                         "partition": "sequential"}, check=check_zero_tprune),
    PruneMethod("kcenter", "ToDRE (greedy k-center token diversity)",
                "greedy k-center (farthest point) selection on token features, prefix tokens as first centers",
                Kind.SELECT, "diversity", {Where.ENCODER: _ENC + "build_kcenter",
                                           Where.VISUAL_BEFORE_LM: _VLM + "choose_kcenter",
                                           Where.VISUAL_IN_LM: _VLM + "choose_kcenter"}),
    PruneMethod("divprune", "DivPrune (Alvar et al., CVPR 2025)",
                "greedy max-min diversity with 1 - cosine distance",
                Kind.SELECT, "diversity", {Where.ENCODER: _ENC + "build_divprune",
                                           Where.VISUAL_BEFORE_LM: _VLM + "choose_divprune",
                                           Where.VISUAL_IN_LM: _VLM + "choose_divprune"}),
    PruneMethod("tome", "ToMe (Bolya et al., ICLR 2023)",
                "bipartite soft matching on head-averaged keys, size-weighted merge, proportional attention; "
                "r as ToMe takes it, clamped per layer as ToMe clamps it; every layer unless --layers",
                Kind.MERGE, "similarity", {Where.ENCODER: _ENC + "build_tome"},
                takes_mask=False, fixed_length=True, max_removal=max_merges, every_layer_by_default=True),
    PruneMethod("fastv", "FastV (Chen et al., ECCV 2024, arXiv 2403.06764)",
                "keep the visual tokens the last prompt token attends to most at a decoder layer (that layer's "
                "own q and k); after the decoder layers given with --layers",
                Kind.SELECT, "attention", {Where.VISUAL_IN_LM: _VLM + "choose_fastv"}),
    PruneMethod("tidal", "TidalDecode (Yang et al., 2024), arXiv 2410.05076",
                "decoder LMs, decode step: selection layers (--layers) pick the top --keep cache positions per KV "
                "head; the layers after each read only those; --option correct=128 rewrites the cache of every 128 "
                "new tokens with one dense pass (the paper's cache correction; 0, the default: never)",
                Kind.SELECT, "attention", {Where.DECODE: "tpc.decode.rewrite:SparseDecode"}, options={"correct": 0},
                check=check_windows),
    PruneMethod("quest", "Quest (Tang et al., ICML 2024), arXiv 2406.10774",
                "decoder LMs, decode step: at each layer from 2 on (--layers), per KV head, the pages of --option "
                "page=16 positions whose key min/max bound the query's logits highest, --keep positions' worth, "
                "are the only ones read",
                Kind.SELECT, "attention", {Where.DECODE: "tpc.decode.quest:QuestDecode"}, options={"page": 16},
                check=check_windows),
    PruneMethod("dhsa", "DHSA (Xiong et al., NeurIPS 2025), arXiv 2510.24606",
                "decoder LMs, decode step: at each layer from 2 on (--layers), the cache is cut into chunks where "
                "adjacent keys' cosine similarity drops below --option threshold=0.5 (min_chunk=8, max_chunk=64 "
                "positions); the new query scores each chunk's length-normalized mean key, and the --keep "
                "positions of the best chunks are the only ones read",
                Kind.SELECT, "attention", {Where.DECODE: "tpc.decode.dhsa:DHSADecode"},
                options={"min_chunk": 8, "max_chunk": 64, "threshold": 0.5}, check=check_chunks),
    PruneMethod("streaming", "StreamingLLM (Xiao et al., ICLR 2024), arXiv 2309.17453",
                "decoder LMs, KV cache: keep the first sinks positions (--option sinks=4) and the most recent ones, "
                "--keep positions per layer",
                Kind.SELECT, "recency", {Where.KV_EVICTION: _KV + "Streaming"}, options={"sinks": 4},
                check=check_windows),
    PruneMethod("h2o", "H2O (Zhang et al., NeurIPS 2023), arXiv 2306.14048",
                "decoder LMs, KV cache: keep the heavy hitters (attention accumulated over every query, per KV "
                "head) and the recent window (default half of --keep)",
                Kind.SELECT, "attention", {Where.KV_EVICTION: _KV + "H2O"}, options={"recent": None},
                check=check_windows),
    PruneMethod("snapkv", "SnapKV (Li et al., 2024), arXiv 2404.14469",
                "decoder LMs, KV cache: at the end of the prefill the last window prompt queries vote per KV head "
                "(pooled), the window is kept; decoding appends",
                Kind.SELECT, "attention", {Where.KV_EVICTION: _KV + "SnapKV"}, options={"window": 32, "kernel": 5},
                check=check_windows),
    PruneMethod("scissorhands", "Scissorhands (Liu et al., NeurIPS 2023), arXiv 2305.17118",
                "decoder LMs, KV cache: drop the positions most often below the mean attention over the last "
                "history queries, per KV head; the recent window kept",
                Kind.SELECT, "attention", {Where.KV_EVICTION: _KV + "Scissorhands"},
                options={"history": 32, "recent": 16}, check=check_windows),
    PruneMethod("random", "baseline", "keep a seeded uniform random subset per example",
                Kind.SELECT, "random", {Where.ENCODER: _ENC + "build_random",
                                        Where.VISUAL_BEFORE_LM: _VLM + "choose_random",
                                        Where.VISUAL_IN_LM: _VLM + "choose_random"}),
):
    register(_m)
