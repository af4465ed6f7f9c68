"""Recipes: which method prunes after which layer, and how much, one step per layer.

:class:`Step` is the one normal form of what a user asks for, for every kind of model: the
single ``--pass`` form, a ``recipe.json``, a VLM's visual-token stages and a decoder's
selection layers are all parsed here (:func:`steps_from_pass`, :func:`load_recipe`,
:func:`visual_steps`, :func:`decode_steps`, with the value parsers of :mod:`tpc.schedule`),
and each path checks the steps against the model it captured.

A recipe is a list of steps ``(layer, method, keep or r, options)``; the single ``--pass``
form (one method, several layers) is the special case where every step has the same method.
Different methods at different layers are legal in any order (merge early with ``tome``,
prune by importance later, or the other way round): a gather after a merge carries the merged
tokens' sizes on, so proportional attention and later merges stay exact. The one combination
refused is ``topk-cls`` with ``fuse=True`` after a ``tome`` step (the fused token's size is not
tracked).

``recipe.json`` is what ``tpc tune`` writes and ``tpc compile --recipe`` reads::

    {"format": "tpc-recipe/1", "model": "...", "tpc_version": "0.1.0", "after": "attention",
     "steps": [{"layer": 0, "method": "tome", "r": 8},
               {"layer": 4, "method": "topk-cls", "keep": 0.6}],
     "metric": {...}, "measured": {...}, "search": {...}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tpc.errors import TpcError, check_readable
from tpc.exports.atomic import atomic_output
from tpc.registry import METHODS, VISUAL, Kind, Where, get_method, methods_for
from tpc.schedule import KeepValue, Removal, check_seed, parse_budget, parse_keep, parse_layers, parse_removals, read_r
from tpc.version import __version__

FORMAT = "tpc-recipe/1"


@dataclass(frozen=True)
class Step:
    """One pruning step: after ``layer``, ``method`` keeps ``keep`` (ratio or count) or removes ``r`` tokens.

    ``layer`` -1 prunes before the first layer (a VLM's visual tokens entering the language
    model). ``tokens_in``/``tokens_out``: the tokens the step chooses among and keeps, where the
    path knows them before rewriting (a VLM's visual tokens per example); None otherwise.
    """

    layer: int
    method: str
    keep: float | int | None = None
    r: int | None = None
    options: dict = field(default_factory=dict)
    tokens_in: int | None = None
    tokens_out: int | None = None

    @property
    def amount(self) -> KeepValue:
        return Removal(self.r) if self.r is not None else self.keep

    def as_dict(self) -> dict:
        out = {"layer": self.layer, "method": self.method}
        out.update({"r": self.r} if self.r is not None else {"keep": self.keep})
        if self.options:
            out["options"] = dict(self.options)
        return out

    def __str__(self) -> str:
        amount = f"r={self.r}" if self.r is not None else f"keep {self.keep}"
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.method}@{self.layer} {amount}{opts}"


def describe(steps: list[Step]) -> str:
    """``tome@0 r=8, topk-cls@4 keep 0.6``."""
    return ", ".join(map(str, steps)) if steps else "unpruned"


def steps_from_pass(method: str, layers, keep=0.7, r=None, options: dict | None = None, pad: bool = False) -> list[Step]:
    """The single ``--pass`` form as a recipe: one method at every listed layer (``r`` in any of
    ToMe's forms; ``pad`` when the layers are every layer by default, as ToMe pads a short list)."""
    layer_list = parse_layers(layers)
    if r is not None and isinstance(read_r(r), tuple):
        layer_list.sort()  # ToMe's schedule runs over the layers in depth order
    amounts = parse_removals(r, len(layer_list), pad=pad) if r is not None else parse_keep(keep, len(layer_list))
    return [Step(layer, method, None if isinstance(a, Removal) else a, int(a) if isinstance(a, Removal) else None,
                 dict(options or {})) for layer, a in zip(layer_list, amounts)]


def visual_steps(method: str, layers, keep) -> list[Step]:
    """A VLM's visual-token pruning as steps in layer order: before the language model (layer -1)
    without ``layers``, after each listed decoder layer with them (one keep each, or one for all);
    keep 0 drops every visual token left, which only a stage inside the language model may do."""
    chosen = get_method(method)
    if not chosen.applies(*VISUAL):
        raise TpcError(f"method {method!r} does not prune visual tokens: choose one of {', '.join(methods_for(*VISUAL))}")
    if layers is not None and not chosen.applies(Where.VISUAL_IN_LM):
        raise TpcError(f"{method} prunes visual tokens only before the language model: drop layers (or use "
                       f"{', '.join(methods_for(Where.VISUAL_IN_LM))} to prune after a decoder layer)")
    if layers is None and not chosen.applies(Where.VISUAL_BEFORE_LM):
        raise TpcError(f"{method} prunes visual tokens only after a decoder layer (it reads that layer's attention): "
                       "give the layer(s) to prune after (--layers), or prune before the language model with "
                       + ", ".join(methods_for(Where.VISUAL_BEFORE_LM)))
    layer_list = [-1] if layers is None else parse_layers(layers)
    keeps = parse_keep(keep, len(layer_list), zero=True, what="pruning stages")
    steps = sorted((Step(layer, method, k) for layer, k in zip(layer_list, keeps)), key=lambda s: s.layer)
    if steps[0].layer == -1 and steps[0].keep == 0:
        raise TpcError("keep 0 drops every visual token; before the language model that is a text-only prompt: "
                       "give the layer after which the text no longer needs them (ToDRE's second stage)")
    return steps


def decode_steps(method: str, layers, keep, *, maximum: int, default_layers=()) -> list[Step]:
    """Decode-time sparse attention as steps, one per selection layer in layer order
    (``default_layers`` when none are given), each keeping ``keep`` cached positions (a count, or a ratio
    of the cache in (0, 1])."""
    known = METHODS.get(method) if isinstance(method, str) else None
    if known is None or not known.applies(Where.DECODE):
        raise TpcError(f"method {method!r} is not a decode-time method: choose one of "
                       f"{', '.join(methods_for(Where.DECODE))}")
    layer_list = list(default_layers) if layers is None else parse_layers(layers)
    budget = parse_budget(keep, maximum, default=256)
    return [Step(layer, method, budget) for layer in sorted(layer_list)]


def check_steps(steps: list[Step]) -> list[Step]:
    """Validated steps in layer order, each method's options resolved; illegal recipes refused in one line."""
    if not steps:
        raise TpcError("the recipe has no steps: give at least one (layer, method, keep or r)")
    parse_layers([s.layer for s in steps])  # integers, non-negative, each layer once
    out, merged = [], None  # the first merging method so far
    for s in sorted(steps, key=lambda s: s.layer):
        method = get_method(s.method, Where.ENCODER)
        if (s.keep is None) == (s.r is None):
            raise TpcError(f"recipe step at layer {s.layer} needs exactly one of keep and r")
        if s.r is not None:
            parse_removals([s.r], 1)
        else:
            parse_keep([s.keep], 1)
        options = method.resolve_options(s.options)
        if merged and options.get("fuse"):
            raise TpcError(f"recipe step at layer {s.layer}: {s.method} with fuse=True cannot follow a {merged} step "
                           f"(the fused token's size is not tracked); drop fuse or move {merged} after it")
        merged = merged or (s.method if method.kind is Kind.MERGE else None)
        out.append(Step(s.layer, s.method, s.keep, s.r, options))
    return out


def step_from_dict(d, where: str) -> Step:
    if not isinstance(d, dict):
        raise TpcError(f"{where}: a recipe step is an object like {{\"layer\": 3, \"method\": \"tome\", \"r\": 8}}, not {d!r}")
    unknown = sorted(set(d) - {"layer", "method", "keep", "r", "options"})
    if unknown:
        raise TpcError(f"{where}: unknown key {unknown[0]!r} in a recipe step (keys: layer, method, keep, r, options)")
    for key in ("layer", "method"):
        if key not in d:
            raise TpcError(f"{where}: a recipe step needs {key!r}")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise TpcError(f"{where}: 'options' of a recipe step is an object, not {options!r}")
    return Step(d["layer"], d["method"], d.get("keep"), d.get("r"), options)


@dataclass
class Recipe:
    """Steps plus the compile settings they were found with, and what was measured (``info``)."""

    steps: list[Step]
    after: str = "attention"
    seed: int = 0
    info: dict = field(default_factory=dict)  # model, tpc_version, metric, measured, search

    def as_dict(self) -> dict:
        head = {"format": FORMAT, "model": self.info.get("model"), "tpc_version": self.info.get("tpc_version", __version__)}
        body = {"after": self.after, "seed": self.seed, "steps": [s.as_dict() for s in self.steps]}
        rest = {k: v for k, v in self.info.items() if k not in head}
        return {**head, **body, **rest}

    def save(self, path: str | os.PathLike) -> Path:
        """Written atomically: a failure leaves no half-written recipe and an existing file untouched."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return Path(path)


def load_recipe(source) -> Recipe:
    """A Recipe from a path to recipe.json, a dict as written, or a list of steps (Step or dicts)."""
    if isinstance(source, Recipe):
        return Recipe(check_steps(source.steps), source.after, source.seed, dict(source.info))
    where = "recipe"
    if isinstance(source, (str, os.PathLike)):
        path = check_readable(source, "recipe", "the recipe.json `tpc tune` wrote")
        where = str(path)
        try:
            source = json.loads(path.read_text())
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
            why = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
            raise TpcError(f"{where} is not valid JSON ({why}): give the recipe.json `tpc tune` wrote") from None
    if isinstance(source, list):
        source = {"steps": source}
    if not isinstance(source, dict) or "steps" not in source:
        raise TpcError(f"{where}: a recipe is an object with 'steps' (see docs/tune.md)")
    fmt = source.get("format", FORMAT)
    if fmt != FORMAT:
        raise TpcError(f"{where}: recipe format {fmt!r} is not one this tpc reads ({FORMAT})")
    raw = source["steps"]
    if not isinstance(raw, list):
        raise TpcError(f"{where}: 'steps' is a list of steps, not {type(raw).__name__}")
    steps = [s if isinstance(s, Step) else step_from_dict(s, f"{where} step {i}") for i, s in enumerate(raw)]
    info = {k: v for k, v in source.items() if k not in ("format", "steps", "after", "seed")}
    seed = check_seed(source.get("seed", 0), f"{where}: 'seed'")
    return Recipe(check_steps(steps), source.get("after", "attention"), seed, info)
