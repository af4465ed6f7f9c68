"""Small helpers over ``torch.fx`` nodes of an exported graph."""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable

import sympy
import torch
from torch import fx

aten = torch.ops.aten



def target_packet(node: fx.Node):
    """The OpOverloadPacket of a call_function node (aten.add for aten.add.Tensor), or its target."""
    target = node.target
    return getattr(target, "overloadpacket", target)


def is_op(node: object, *packets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and target_packet(node) in packets


# Ops whose output is their first operand up to dtype, device, layout, a copy or dropout: same
# shape, each element where it was. The attention finder walks through them (a cast between the
# logits and the softmax, dropout on the probabilities); the token-axis rules carry the operand's
# token axes through them. One list for both.
PASS_THROUGH = frozenset({
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten._to_copy.default, aten.type_as.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
})


def is_pass_through(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in PASS_THROUGH


def val(node: object):
    """The fake value torch.export recorded for a node (a FakeTensor, SymInt, tuple or None)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced the node ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if isinstance(path, str) and not path.startswith("_empty"):
            return path
    return ""


def describe(node: fx.Node) -> str:
    """``node 'reshape_4' (aten.reshape) in blocks.2.attn`` — for error messages."""
    target = target_packet(node) if node.op == "call_function" else node.target
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_qualified_op_name"):
        name = target._qualified_op_name.replace("::", ".")
    where = module_path(node)
    return f"node '{node.name}' ({name})" + (f" in {where or 'the top-level module'}")


def size_at(size, value_of) -> int:
    """An int for a static size; a symbolic size evaluated with each symbol set to ``value_of(symbol)``."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    return int(expr.subs({sym: value_of(sym) for sym in expr.free_symbols}))


@functools.cache
def stand_in(symbol) -> int:
    """A symbol's stand-in when shapes are compared numerically: a distinct prime above 10⁶ per
    symbol (the 2k-th for a size ``s<k>``, the (2k+1)-th for an unbacked ``u<k>``), so a product of
    symbolic and static sizes never equals an unrelated static size, and the same symbol always
    gets the same number."""
    match = re.fullmatch(r"([su])(\d+)", str(symbol))
    if match:
        index = 2 * int(match.group(2)) + (match.group(1) == "u")
    else:
        index = 4096 + zlib.crc32(str(symbol).encode()) % 1024
    return int(sympy.nextprime(10**6, index + 1))


def numeric_size(size) -> int:
    """An int for a static size; a symbolic size evaluated at its symbols' stand-ins (``stand_in``)."""
    return size_at(size, stand_in)


def shape_text(node_or_val, symbols: dict[str, str] | None = None) -> str:
    """``[B, 197, 384]``: a shape for messages, the symbolic batch written as B (or each
    symbol by its name in ``symbols``, e.g. ``{"s0": "B", "s1": "S"}``)."""
    value = val(node_or_val) if isinstance(node_or_val, fx.Node) else node_or_val

    def name(match) -> str:
        return (symbols or {}).get(match.group(0), "B")

    dims = [str(s) if isinstance(s, int) else re.sub(r"\bs\d+\b", name, str(s)) for s in value.shape]
    return f"[{', '.join(dims)}]"


def input_symbols(gm: fx.GraphModule):
    """(input value, dim, size) for every dim of a graph input that is a plain symbol."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = val(node)
        if isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if not isinstance(size, int) and size.node.expr.is_symbol:
                    yield value, d, size


def symbol_names(gm: fx.GraphModule) -> dict[str, str]:
    """Readable names of the graph's input symbols: B for a batch (dim 0), N for a sequence
    length (dim 1 of an integer [B, N] input)."""
    names = {}
    for value, d, size in input_symbols(gm):
        if d == 0:
            names.setdefault(str(size.node.expr), "B")
        elif d == 1 and value.dim() == 2 and not value.dtype.is_floating_point:
            names.setdefault(str(size.node.expr), "N")
    return names


def to_front(rank: int, *dims: int) -> tuple[list[int], list[int]]:
    """The permutation that moves ``dims`` to the front in that order (the others keep theirs),
    and its inverse: ``x.permute(perm).permute(inverse)`` is ``x``."""
    perm = [*dims, *(d for d in range(rank) if d not in dims)]
    return perm, [perm.index(d) for d in range(rank)]


def numeric_shape(node_or_val) -> tuple[int, ...]:
    value = val(node_or_val) if isinstance(node_or_val, fx.Node) else node_or_val
    return tuple(numeric_size(s) for s in value.shape)


def batch_size_numeric(gm: fx.GraphModule) -> int | None:
    """Numeric stand-in of the first input's dim 0 when it is symbolic (the dynamic batch)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = val(node)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and not isinstance(value.shape[0], int):
            return numeric_size(value.shape[0])
    return None


def ancestors(node: fx.Node, stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """Every node the value of ``node`` depends on (not including itself)."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    stop = set(stop)
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def scalar_value(arg) -> float | None:
    """A Python number argument, or None for a tensor/node."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    return None

