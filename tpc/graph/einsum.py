"""Attention written with einsum, rewritten as the matmuls it is so the attention finder sees it.

torch.export keeps ``aten.einsum``; the two attention equations become
``'...qd,...kd->...qk'(q, k) = q @ kᵀ`` and ``'...qk,...kd->...qd'(p, v) = p @ v`` (the same
leading letters on both operands and the output, each letter once per operand). Other
equations are left as they are.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def _matmul_form(equation: str) -> bool | None:
    """True: ``a @ bᵀ``; False: ``a @ b``; None: not a batched matrix product einsum."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    operands = inputs.split(",")
    if len(operands) != 2 or "." in equation:
        return None
    a, b = operands
    if not (len(a) == len(b) == len(out) >= 2 and a[:-2] == b[:-2] == out[:-2]) or \
            any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    (i, j), (m, n), (o, p) = a[-2:], b[-2:], out[-2:]
    if len({i, j, m}) == 3 and n == j and (o, p) == (i, m):
        return True
    if len({i, j, n}) == 3 and m == j and (o, p) == (i, n):
        return False
    return None


def einsum_to_matmul(gm: fx.GraphModule) -> None:
    """Rewrite in place each two-operand batched-matmul einsum as matmul (with a transpose for ``q kᵀ``)."""
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.einsum.default)):
        equation, operands = node.args[0], node.args[1]
        transposed = _matmul_form(equation)
        if transposed is None or len(operands) != 2:
            continue
        a, b = operands
        with gm.graph.inserting_before(node):
            if transposed:
                b_val = b.meta["val"]
                b = gm.graph.call_function(aten.transpose.int, (b, -2, -1))
                b.meta = {**node.meta, "val": b_val.transpose(-2, -1)}
            matmul = gm.graph.call_function(aten.matmul.default, (a, b))
        matmul.meta = dict(node.meta)
        node.replace_all_uses_with(matmul)
        gm.graph.erase_node(node)
    gm.recompile()
