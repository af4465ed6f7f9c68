"""The pruning methods every test runs, generated from tpc's method registry, so a new method is
tested everywhere without editing tests. A spec is a method name, optionally with options:
``topk-cls+fuse`` (a bool option set), ``zero-tprune+iterations=20``."""

from __future__ import annotations

from tpc.passes import METHODS

# Options that change the graph enough to be tested as a method of their own.
VARIANTS = ("topk-cls+fuse",)
SPECS = [*METHODS, *VARIANTS]

# Methods that merge tokens rather than keep a subset of them: they take no attention mask and
# need a fixed sequence length. Every other method (a new one included) is tested on padded text.
MERGING = ("tome",)
SELECTING = [m for m in METHODS if m not in MERGING]
# What a selecting method needs at a dynamic sequence length (zero-tprune's similarity stage needs a fixed one).
DYNAMIC_LENGTH_OPTIONS = {"zero-tprune": {"similarity": 0.0}}


def parse_spec(spec: str) -> tuple[str, dict | None]:
    """'topk-cls+fuse' -> ('topk-cls', {'fuse': True}); 'zero-tprune+iterations=20' -> (..., {'iterations': 20})."""
    method, *opts = spec.split("+")
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        options[key] = int(value) if value else True
    return method, options or None
