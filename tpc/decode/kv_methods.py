"""The KV-eviction methods of the registry (``Where.KV_EVICTION``): their rule, options and budget.

``keep`` is the budget of every layer: a number of cached positions (``256``) or a ratio of the
prompt (``0.2``: a fifth of the batch's prompt length, rounded up), the same for every example.
"""

from __future__ import annotations

import math

from tpc.decode.capture import MAX_CACHE
from tpc.errors import TpcError
from tpc.registry import METHODS, Where, get_method, methods_for
from tpc.schedule import parse_kv_budget


def kv_eviction(method) -> bool:
    """Whether ``method`` is a registered KV-eviction method (``tpc/registry.py``, ``Where.KV_EVICTION``)."""
    known = METHODS.get(method) if isinstance(method, str) else None
    return known is not None and known.applies(Where.KV_EVICTION)


def check_keep(keep) -> int | float:
    """``keep`` as positions (int >= 1, at most a decode step's cache) or a ratio in (0, 1]."""
    return parse_kv_budget(keep, MAX_CACHE, default=256)


def budget_for(keep: int | float, prompt_length: int) -> int:
    """The budget of every layer for a batch whose prompts are ``prompt_length`` positions long."""
    return keep if isinstance(keep, int) else max(1, math.ceil(keep * prompt_length))


def eviction_rule(method: str, keep, options: dict | None):
    """(the method's rule class, its resolved options); a budget the rule's windows do not fit refused."""
    if not kv_eviction(method):
        raise TpcError(f"method {method!r} is not a KV-eviction method: choose one of "
                       f"{', '.join(methods_for(Where.KV_EVICTION))}")
    entry = get_method(method, Where.KV_EVICTION)
    rule, options = entry.implementation(Where.KV_EVICTION), entry.resolve_options(options)
    keep = check_keep(keep)
    if isinstance(keep, int):
        rule.check(method, keep, options)
    return rule, options


def refuse_kv_artifact(method, command: str = "compile") -> None:
    """A compressed KV cache lives while generating: ``tpc compile`` and ``tpc inspect`` have nothing to write or show."""
    if kv_eviction(method):
        raise TpcError(f"{method} compresses the KV cache while generating: tpc {command} has no artifact for it; use "
                       f"tpc.compile(model, method='{method}', keep=256).generate(...) in Python, or tpc bench "
                       f"--pass {method} for its KV bytes and step latency")
