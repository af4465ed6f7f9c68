"""Count the prefix tokens ([CLS], distillation token, registers) at the front of the sequence.

ViTs build the sequence with ``cat([cls.expand(B,-1,-1), (reg…,) patches], dim=token)``; the
leading inputs that do not depend on the image data are the prefix. Walking back from the
first block's input through same-shaped ops (position-embedding add, dropout, norm) finds
that cat. Text encoders have no such cat: their [CLS] is token 0, counted as a prefix when
the graph reads token 0 on its own (a CLS pooler).
"""

from __future__ import annotations

from torch import fx

from tpc.graph.nodes import aten, is_op, numeric_shape, val
from tpc.graph.stream import StreamPoint


def _data_ancestors(node: fx.Node) -> set[fx.Node]:
    """Ancestors through data edges only (a sym_size of the input reads its shape, not its data)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not is_op(n, aten.sym_size):
            todo.extend(n.all_input_nodes)
    return seen


def _reads_input_data(node: fx.Node) -> bool:
    return any(n.op == "placeholder" for n in _data_ancestors(node))


def _sequence_cat(start: fx.Node, token_dim: int, tokens: int) -> fx.Node | None:
    node = start
    for _ in range(64):
        if node.op != "call_function":
            return None
        if is_op(node, aten.cat):
            dim = node.args[1] if len(node.args) > 1 else 0
            if dim % len(val(node).shape) == token_dim:
                return node
        same = [a for a in node.all_input_nodes if isinstance(val(a), type(val(node)))
                and numeric_shape(a) == numeric_shape(node) and _reads_input_data(a)]
        if not same:
            return None
        node = same[0]
    return None


def count_prefix_tokens(first_block_input: fx.Node, point: StreamPoint) -> tuple[int, str]:
    """(number of prefix tokens, how it was found)."""
    cat = _sequence_cat(first_block_input, point.token_dim, point.tokens)
    if cat is not None:
        count = 0
        for part in cat.args[0]:
            if _reads_input_data(part):
                break
            count += numeric_shape(part)[point.token_dim]
        return count, f"leading inputs of {cat.name} (the token sequence cat)"
    graph = first_block_input.graph
    for node in graph.nodes:
        if is_op(node, aten.select) and len(val(node.args[0]).shape) == 3:
            shape = numeric_shape(node.args[0])
            dim = node.args[1] % 3
            if dim == point.token_dim and shape[dim] == point.tokens and node.args[2] == 0:
                return 1, f"token 0 is read on its own by {node.name} (a [CLS] pooler)"
    return 0, "no [CLS]/register tokens found"
