"""Recipes: which method prunes after which layer, and how much, one step per layer.

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
from tpc.registry import Kind, Where, get_method
from tpc.schedule import KeepValue, Removal, parse_keep, parse_layers, parse_removals, read_r
from tpc.version import __version__

FORMAT = "tpc-recipe/1"


@dataclass(frozen=True)
class Step:
    """One pruning step: after ``layer``, ``method`` keeps ``keep`` (ratio or count) or removes ``r`` tokens."""

    layer: int
    method: str
    keep: float | int | None = None
    r: int | None = None
    options: dict = field(default_factory=dict)

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
        from tpc.exports.atomic import atomic_output

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
    from tpc.models import check_seed

    seed = check_seed(source.get("seed", 0), f"{where}: 'seed'")
    return Recipe(check_steps(steps), source.get("after", "attention"), seed, info)
