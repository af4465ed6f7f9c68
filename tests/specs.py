"""The pruning methods every test runs, generated from tpc's method registry, so a new method is
tested everywhere without editing tests. A spec is a method name, optionally with options:
``topk-cls+fuse`` (a bool option set), ``zero-tprune+iterations=20``."""

from __future__ import annotations

from tpc.registry import METHODS, Kind, Where

ENCODER = [m for m in METHODS.values() if m.applies(Where.ENCODER)]
ENCODER_METHODS = [m.name for m in ENCODER]
# Options that change the graph enough to be tested as a method of their own.
VARIANTS = ("topk-cls+fuse",)
SPECS = [*ENCODER_METHODS, *VARIANTS]


def rotated(specs, models) -> list[tuple[str, str]]:
    """Each spec on one of ``models`` in turn: every method's lowering is checked, every model's graph is
    lowered under several methods, in a third of the cases of the full cross product (each ONNX export
    and its checks take seconds). The pipeline tests still run every spec on every model."""
    models = list(models)
    return [(spec, models[i % len(models)]) for i, spec in enumerate(specs)]

# Methods that keep a subset of the tokens, taking an attention mask at any sequence length, are
# tested on padded text; merging methods (no mask, a fixed length) are not.
SELECTING = [m.name for m in ENCODER if m.kind is Kind.SELECT and m.takes_mask and not m.fixed_length]
# The methods that prune a VLM's visual tokens before the language model, and after a decoder layer.
VISUAL_BEFORE = [m.name for m in METHODS.values() if m.applies(Where.VISUAL_BEFORE_LM)]
VISUAL_INSIDE = [m.name for m in METHODS.values() if m.applies(Where.VISUAL_IN_LM)]


def parse_spec(spec: str) -> tuple[str, dict | None]:
    """'topk-cls+fuse' -> ('topk-cls', {'fuse': True}); 'zero-tprune+iterations=20' -> (..., {'iterations': 20})."""
    method, *opts = spec.split("+")
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        options[key] = int(value) if value else True
    return method, options or None
