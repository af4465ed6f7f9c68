"""Readable text of a rewritten graph around every inserted node, for golden tests and review.

Only the interesting part is printed: nodes tpc inserted (``+``), nodes whose shape
arguments it rewrote (``~``), and their direct neighbours (`` ``), in graph order with
``...`` between chunks. Node names are normalized (``%add_3`` -> ``%add.0`` by order of
appearance), a symbolic batch prints as ``B`` and a symbolic sequence length as ``N``, so the text changes only when the rewrite
does.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from tpc.graph.nodes import shape_text, symbol_names, target_packet, val
from tpc.record import is_rewritten, role_of


def _op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = target_packet(node)
    qual = getattr(target, "_qualified_op_name", None)
    if qual:
        return qual.replace("::", ".")
    return getattr(target, "__name__", str(target))


def _shape(value, symbols=None) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "") + shape_text(value, symbols)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape(v, symbols) for v in value) + ")"
    return type(value).__name__ if value is not None else ""


def format_rewrites(gm: fx.GraphModule, symbols: dict[str, str] | None = None) -> str:
    """The text; ``symbols`` names symbolic sizes (default: the graph's input symbols as
    ``symbol_names`` reads them, B for a batch and N for a sequence length; any other as B)."""
    nodes = list(gm.graph.nodes)
    symbols = {**symbol_names(gm), **(symbols or {})}
    marked = {n for n in nodes if role_of(n) is not None or is_rewritten(n)}
    show = set(marked)
    for n in marked:
        show.update(a for a in n.all_input_nodes if a.op == "call_function")
        show.update(u for u in n.users if u.op == "call_function")
    names: dict[fx.Node, str] = {}
    counters: dict[str, int] = {}

    def name(n: fx.Node) -> str:
        if n not in names:
            base = re.sub(r"_\d+$", "", n.name) if n.op != "call_function" else _op_name(n).split(".")[-1]
            base = n.name if n.op in ("placeholder", "get_attr") else base
            counters[base] = counters.get(base, -1) + 1
            names[n] = f"%{base}.{counters[base]}" if n.op == "call_function" else f"%{base}"
        return names[n]

    def fmt_arg(a) -> str:
        if isinstance(a, fx.Node):
            return name(a)
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt_arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if isinstance(a, float):
            return f"{a:.6g}"
        return repr(a)

    lines, last = [], -2
    for i, n in enumerate(nodes):
        if n not in show:
            continue
        if last >= 0 and i != last + 1:
            lines.append("...")
        last = i
        mark = "~" if is_rewritten(n) else ("+" if role_of(n) is not None else " ")
        args = ", ".join([fmt_arg(a) for a in n.args] + [f"{k}={fmt_arg(v)}" for k, v in n.kwargs.items()])
        lines.append(f"{mark} {name(n)} = {_op_name(n)}({args}) :: {_shape(val(n), symbols)}")
    return "\n".join(lines) + "\n"
