"""Attention written with einsum, rewritten as the matmuls it is so the attention finder sees it.

torch.export keeps ``aten.einsum``. A two-operand einsum that is one batched matrix product —
batch letters on both operands and the output, one letter contracted, one free letter per
operand (``'bhqd,bhkd->bhqk'``, ``'...id,...jd->...ij'``, ``'bqhd,bkhd->bhqk'``,
``'bhqd,bhdk->bhqk'``, ``'bhqk,bkhd->bqhd'``, any letters, any order) — becomes permutes, a
``matmul`` and a permute of its result: ``q @ kᵀ`` keeps the ``transpose(-2, -1)`` of the
key the finder reads, ``p @ v`` reads ``v`` as it is. The rewrite computes the same numbers as
the einsum. Other einsums are left as they are: the attention finder does not see them, and
propagation refuses one that reads pruned tokens, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
_ELLIPSIS = "0123456789"  # stand-ins for the dims under '...' (never einsum letters)


@dataclass(frozen=True)
class Product:
    """``left @ right`` over the einsum's letters: ``batch`` on both, ``rows`` of the left,
    ``inner`` contracted, ``cols`` of the right; ``swap``: the einsum's second operand is the left."""

    left: str
    right: str
    batch: tuple[str, ...]
    rows: str
    inner: str
    cols: str
    out: str
    swap: bool


def _expand(operand: str, rank: int) -> str | None:
    if "..." not in operand:
        return operand if len(operand) == rank else None
    hidden = rank - (len(operand) - 3)
    return operand.replace("...", _ELLIPSIS[:hidden]) if 0 <= hidden <= len(_ELLIPSIS) else None


def product_of(equation: str, ranks: tuple[int, int]) -> Product | None:
    """The matrix product ``equation`` is over operands of ``ranks``; None when it is not one."""
    inputs, arrow, out = equation.replace(" ", "").partition("->")
    operands = inputs.split(",")
    if not arrow or len(operands) != 2 or any(c.isdigit() for c in equation):
        return None
    a, b = (_expand(op, r) for op, r in zip(operands, ranks))
    if a is None or b is None:
        return None
    hidden = [c for c in a if c.isdigit()]
    if hidden != [c for c in b if c.isdigit()]:
        return None  # '...' over different ranks: broadcast, not one product
    out = out.replace("...", "".join(hidden))
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    inner = [c for c in a if c in b and c not in out]
    free_a, free_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if len(inner) != 1 or len(free_a) != 1 or len(free_b) != 1 or not {*free_a, *free_b} <= set(out):
        return None
    batch = tuple(c for c in out if c in a and c in b)
    swap = out.index(free_b[0]) < out.index(free_a[0])  # the output's rows come from the second operand
    (left, rows), (right, cols) = ((b, free_b[0]), (a, free_a[0])) if swap else ((a, free_a[0]), (b, free_b[0]))
    return Product(left, right, batch, rows, inner[0], cols, out, swap)


def _arrange(gm: fx.GraphModule, x: fx.Node, letters: str, batch: tuple, first: str, second: str, meta: dict) -> fx.Node:
    """``x`` as ``batch + (first, second)``: one permute keeping the order ``first``/``second`` have
    in ``x`` (skipped when nothing moves), then a transpose of the last two when that order is reversed."""
    order = [*batch, *sorted((first, second), key=letters.index)]
    perm = [letters.index(c) for c in order]
    if perm != list(range(len(perm))):
        x = _node(gm, aten.permute.default, (x, perm), meta, x.meta["val"].permute(perm))
    if order[-1] != second:
        x = _node(gm, aten.transpose.int, (x, -2, -1), meta, x.meta["val"].transpose(-2, -1))
    return x


def _node(gm: fx.GraphModule, target, args: tuple, meta: dict, value) -> fx.Node:
    node = gm.graph.call_function(target, args)
    node.meta = {**meta, "val": value}
    return node


def einsum_to_matmul(gm: fx.GraphModule) -> None:
    """Rewrite in place each two-operand einsum that is one batched matrix product (see the module docstring)."""
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.einsum.default)):
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 2 or not all(isinstance(o, fx.Node) and "val" in o.meta for o in operands):
            continue
        p = product_of(equation, tuple(o.meta["val"].dim() for o in operands))
        if p is None:
            continue
        left, right = operands[::-1] if p.swap else operands
        result = [*p.batch, p.rows, p.cols]
        back = [result.index(c) for c in p.out]  # the matmul's dims in the einsum's output order
        value = node.meta["val"]
        with gm.graph.inserting_before(node):
            left = _arrange(gm, left, p.left, p.batch, p.rows, p.inner, node.meta)
            right = _arrange(gm, right, p.right, p.batch, p.inner, p.cols, node.meta)
            unpermuted = value.permute([back.index(i) for i in range(len(back))])
            out = _node(gm, aten.matmul.default, (left, right), node.meta, unpermuted)
            if back != list(range(len(back))):
                out = _node(gm, aten.permute.default, (out, back), node.meta, value)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()
