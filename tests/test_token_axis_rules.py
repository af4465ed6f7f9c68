"""The token-axis rule table on graphs of a few aten nodes built by hand (no model, no export).

The stream ``x`` is [B=2, N=9, C=6] with one prefix token, pruned to K=5 tokens; each test
checks what a rule infers (where the token axis is after the op, which operands are side
tensors to gather), what it rewrites (size arguments for K), that the keyword and positional
forms of a call agree, and the refusals. ``propagate`` runs the table over a whole graph.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from tpc.errors import TpcError
from tpc.graph.nodes import PASS_THROUGH, val
from tpc.passes.compaction import Compaction, is_rewritten
from tpc.passes.propagate_token_axis import Propagation, propagate
from tpc.passes.token_axis_rules import (
    INT_MAX, RULES, Axis, Gather, Refusal, arguments, rule_for, same_axes,
)

aten = torch.ops.aten
B, N, K, C = 2, 9, 5, 6
T = Axis()  # the token axis itself


class Graph:
    """A hand-built aten graph whose nodes carry the fake values their ops give."""

    def __init__(self):
        self.graph = fx.Graph()
        self.mode = FakeTensorMode()
        self.x = self.input("x", B, N, C)
        self.index = self.input("index", B, K, dtype=torch.int64)

    def input(self, name, *shape, dtype=torch.float32):
        node = self.graph.placeholder(name)
        with self.mode:
            node.meta["val"] = torch.empty(shape, dtype=dtype)
        return node

    def op(self, target, *args, **kwargs):
        node = self.graph.call_function(target, args, kwargs)
        with self.mode:
            node.meta["val"] = target(*fx.node.map_arg(args, val), **fx.node.map_arg(kwargs, val))
        return node

    def output(self, *nodes):
        self.graph.output(tuple(nodes))

    def module(self) -> fx.GraphModule:
        return fx.GraphModule(torch.nn.Module(), self.graph)

    def compaction(self, gm) -> Compaction:
        return Compaction(layer=0, method="test", module="", out=self.x, index=self.index,
                          tokens_in=N, tokens_out=K, prefix=1)

    def context(self, **tracked) -> Propagation:
        gm = self.module()
        ctx = Propagation(gm, self.compaction(gm))
        for node, axes in tracked.values():
            ctx.tracked[node] = axes
        return ctx

    def propagate(self) -> fx.GraphModule:
        gm = self.module()
        propagate(gm, self.compaction(gm))
        return gm


def infer(g: Graph, node, **tracked):
    ctx = g.context(**tracked)
    return rule_for(node).infer(ctx, node, arguments(node))


def resize(g: Graph, node, **tracked):
    ctx = g.context(**tracked)
    rule = rule_for(node)
    args = arguments(node)
    return rule.resize(ctx, node, args, rule.infer(ctx, node, args).axes)


def refusal(g: Graph, node, **tracked) -> str:
    with pytest.raises(Refusal) as r:
        infer(g, node, **tracked)
    return str(r.value)


# --------------------------------------------------------------------------- the table itself


def test_the_table_is_keyed_by_op_overloads():
    for op in RULES:
        assert isinstance(op, torch._ops.OpOverload) or op is operator.getitem, op


def test_arguments_are_read_by_schema_name_with_defaults():
    g = Graph()
    positional = g.op(aten.slice.Tensor, g.x, 1, 1)
    keyword = g.op(aten.slice.Tensor, g.x, dim=1, start=1)
    expected = {"input": g.x, "dim": 1, "start": 1, "end": None, "step": 1}
    assert arguments(positional) == arguments(keyword) == expected


def test_an_op_outside_the_table_is_refused_with_its_name():
    g = Graph()
    y = g.op(aten.cumsum.default, g.x, 2)
    g.output(y)
    assert rule_for(y) is None
    with pytest.raises(TpcError, match=r"node 'cumsum_default' \(aten\.cumsum\) in the top-level module: "
                                         r"reads the tokens and tpc has no token-axis rule for this op"):
        g.propagate()


# --------------------------------------------------------------------------- elementwise


def test_pointwise_broadcasts_and_gathers_a_side_tensor():
    g = Graph()
    bias = g.input("bias", 1, N, C)
    for add in (g.op(aten.add.Tensor, g.x, bias), g.op(aten.add.Tensor, g.x, other=bias)):
        out = infer(g, add)
        assert out.axes == {1: T} and out.gathers == (Gather("other", 1, T),)


def test_pointwise_side_tensor_is_replaced_by_its_gather_in_the_graph():
    g = Graph()
    bias = g.input("bias", 1, N, C)
    add = g.op(aten.add.Tensor, g.x, other=bias)
    g.output(add)
    g.propagate()
    gathered = add.kwargs["other"]
    assert gathered.target is torch.ops.tpc.gather_tokens.default and gathered.args == (bias, g.index)


def test_pointwise_refuses_an_operand_of_another_length_and_two_layouts():
    g = Graph()
    bias = g.input("bias", 1, N, C)
    patches = dict(p=(g.x, {1: Axis(1, 1)}))  # as if x were x[:, 1:] of a 10-token stream
    assert refusal(g, g.op(aten.mul.Tensor, g.x, bias), **patches) == \
        "an operand has 9 entries where the stream has 8 tokens"
    a, b = g.input("a", B, N, N), g.input("b", B, N, N)
    assert refusal(g, g.op(aten.add.Tensor, a, b), a=(a, {1: T, 2: T}), b=(b, {1: T, 2: Axis(1, 1)})) == \
        "combines two token axes of different layouts"


def test_elementwise_ops_torch_does_not_tag_pointwise_and_binary_max():
    g = Graph()
    mask = g.input("mask", B, N, 1, dtype=torch.bool)
    assert infer(g, g.op(aten.masked_fill.Tensor, g.x, mask, g.op(aten.scalar_tensor.default, 0.0))).axes == {1: T}
    assert infer(g, g.op(aten.hardswish.default, g.x)).axes == {1: T}
    assert infer(g, g.op(aten.max.other, g.x, g.x)).axes == {1: T}


def test_pass_through_ops_share_one_list_with_the_attention_finder():
    g = Graph()
    assert all(RULES[op].infer is same_axes for op in PASS_THROUGH)
    for node in (g.op(aten.clone.default, g.x), g.op(aten._to_copy.default, g.x, dtype=torch.float16),
                 g.op(aten.dropout.default, g.x, 0.1, False), g.op(aten.zeros_like.default, g.x)):
        assert infer(g, node).axes == {1: T}


def test_type_as_takes_only_the_dtype_of_its_other_operand():
    """Regression: type_as was broadcast like an add, so ``y.type_as(stream)`` with y of another
    length was refused and a y of the stream's length was tracked as if it were the stream."""
    g = Graph()
    y = g.input("y", B, 7, C)
    cast = g.op(aten.type_as.default, y, g.x)
    g.output(cast)
    g.propagate()  # refused before: "an operand has 7 entries where the stream has 9 tokens"
    assert cast.args == (y, g.x)


# --------------------------------------------------------------------------- views and reshapes


def test_view_moves_the_axis_and_resizes_the_token_dim():
    g = Graph()
    for v in (g.op(aten.view.default, g.x, [B, N, 3, 2]), g.op(aten.view.default, g.x, size=[B, N, 3, 2])):
        assert infer(g, v).axes == {1: T}
        assert resize(g, v) == {"size": [B, K, 3, 2]}
    flat = g.op(aten.reshape.default, g.x, shape=[B * N, C])
    assert infer(g, flat).axes == {0: T} and resize(g, flat) == {"shape": [B * K, C]}


def test_view_back_to_a_grid_is_refused():
    g = Graph()
    patches = g.op(aten.slice.Tensor, g.x, 1, 1, INT_MAX)
    grid = g.op(aten.view.default, patches, [B, 2, 4, C])
    assert "splits the 8 tokens into [2, 2, 4, 6]" in refusal(g, grid, p=(patches, {1: Axis(1, 1)}))


def test_view_rewrite_lands_in_the_graph_and_marks_the_node():
    g = Graph()
    v = g.op(aten.view.default, g.x, [B, N * C])
    g.output(v)
    g.propagate()
    assert v.args == (g.x, [B, K * C]) and is_rewritten(v)


def test_unflatten_resizes_the_sizes_from_its_dim_on():
    g = Graph()
    for u in (g.op(aten.unflatten.int, g.x, 1, [N, 1]), g.op(aten.unflatten.int, g.x, dim=1, sizes=[N, 1])):
        assert infer(g, u).axes == {1: T} and resize(g, u) == {"sizes": [K, 1]}
    inner = g.op(aten.unflatten.int, g.x, 2, [3, 2])
    assert resize(g, inner) == {"sizes": [3, 2]}


def test_flatten_squeeze_unsqueeze():
    g = Graph()
    assert infer(g, g.op(aten.flatten.using_ints, g.x, 0, 1)).axes == {0: T}
    u = g.op(aten.unsqueeze.default, g.x, 1)
    assert infer(g, u).axes == {2: T}
    assert infer(g, g.op(aten.squeeze.dim, u, 1), u=(u, {2: T})).axes == {1: T}


def test_expand_resizes_the_token_dim():
    g = Graph()
    u = g.op(aten.unsqueeze.default, g.x, 2)
    e = g.op(aten.expand.default, u, [B, N, 3, C])
    assert infer(g, e, u=(u, {1: T})).axes == {1: T}
    assert resize(g, e, u=(u, {1: T})) == {"size": [B, K, 3, C]}
    keep = g.op(aten.expand.default, u, [-1, -1, 3, -1])
    assert resize(g, keep, u=(u, {1: T})) == {"size": [-1, -1, 3, -1]}


# --------------------------------------------------------------------------- permutes


@pytest.mark.parametrize("build", [
    lambda g: g.op(aten.transpose.int, g.x, 1, 2),
    lambda g: g.op(aten.transpose.int, g.x, dim0=-1, dim1=1),
    lambda g: g.op(aten.permute.default, g.x, [0, 2, 1]),
    lambda g: g.op(aten.permute.default, g.x, dims=[0, -1, -2]),
    lambda g: g.op(aten.movedim.int, g.x, 1, -1),
    lambda g: g.op(aten.movedim.intlist, g.x, source=[1], destination=[2]),
])
def test_permutes_move_the_token_axis(build):
    g = Graph()
    assert infer(g, build(g)).axes == {2: T}


def test_t_of_a_matrix():
    g = Graph()
    m = g.input("m", N, C)
    assert infer(g, g.op(aten.t.default, m), m=(m, {0: T})).axes == {1: T}


# --------------------------------------------------------------------------- slices and reads


def test_slice_that_drops_the_prefix_moves_the_offset_and_runs_to_the_end():
    g = Graph()
    for s in (g.op(aten.slice.Tensor, g.x, 1, 1, N), g.op(aten.slice.Tensor, g.x, dim=1, start=1, end=N)):
        assert infer(g, s).axes == {1: Axis(1, 1)}
        assert resize(g, s) == {"end": INT_MAX}
    whole = g.op(aten.slice.Tensor, g.x, 1, 0, INT_MAX)
    assert infer(g, whole).axes == {1: T} and resize(g, whole) == {}
    prefix = g.op(aten.slice.Tensor, g.x, 1, 0, 1)
    assert infer(g, prefix).axes == {}
    assert refusal(g, g.op(aten.slice.Tensor, g.x, 1, 2, 5)) == "slices tokens [2:5] of 9, which pruning moves"
    assert "strided" in refusal(g, g.op(aten.slice.Tensor, g.x, 1, 0, INT_MAX, 2))


def test_slice_with_keyword_bounds():
    """Regression: start/end/step given as keywords were read as absent, so ``x[:, 1:]`` kept
    the offset of ``x`` and the view after it was refused as a split of 9 tokens."""
    g = Graph()
    patches = g.op(aten.slice.Tensor, g.x, dim=1, start=1)
    v = g.op(aten.view.default, patches, [B, N - 1, C])
    g.output(v)
    g.propagate()
    assert v.args == (patches, [B, K - 1, C])


def test_select_reads_only_prefix_tokens():
    g = Graph()
    for s in (g.op(aten.select.int, g.x, 1, 0), g.op(aten.select.int, g.x, dim=1, index=0)):
        assert infer(g, s).axes == {}
    assert infer(g, g.op(aten.select.int, g.x, 2, 3)).axes == {1: T}
    assert refusal(g, g.op(aten.select.int, g.x, 1, -1)).startswith("reads token -1 on its own")


def test_select_with_keywords_in_a_graph():
    """Regression: select unpacked its three positional arguments and crashed on keywords."""
    g = Graph()
    cls = g.op(aten.select.int, g.x, dim=1, index=0)
    g.output(cls)
    g.propagate()


def test_reading_the_token_count_and_embedding_by_tokens():
    g = Graph()
    assert refusal(g, g.op(aten.sym_size.int, g.x, 1)) == "reads the token count as a number"
    assert infer(g, g.op(aten.sym_size.int, g.x, dim=2)).axes is None
    ids = g.input("ids", B, N, dtype=torch.int64)
    table = g.input("table", 20, C)
    assert infer(g, g.op(aten.embedding.default, table, ids), i=(ids, {1: T})).axes == {1: T}


# --------------------------------------------------------------------------- joins and splits


def test_cat_along_channels_gathers_a_side_piece():
    g = Graph()
    side = g.input("side", B, N, 2)
    for c in (g.op(aten.cat.default, [g.x, side], 2), g.op(aten.cat.default, [g.x, side], dim=-1)):
        out = infer(g, c)
        assert out.axes == {1: T} and out.gathers == (Gather(("tensors", 1), 1, T),)


def test_cat_in_front_of_the_stream_and_along_tokens():
    g = Graph()
    cls = g.input("cls", B, 1, C)
    front = g.op(aten.cat.default, [cls, g.x], 1)
    assert infer(g, front).axes == {1: Axis(1, -1)}
    for both in (g.op(aten.cat.default, [g.x, g.x], 1), g.op(aten.cat.default, [g.x, g.x], dim=1)):
        assert refusal(g, both) == "concatenates along the token axis"


def test_cat_with_a_keyword_dim_in_a_graph():
    """Regression: a keyword ``dim`` was read as dim 0, so joining two streams along the tokens
    passed as a join along the batch."""
    g = Graph()
    both = g.op(aten.cat.default, [g.x, g.x], dim=1)
    g.output(both)
    with pytest.raises(TpcError, match="concatenates along the token axis"):
        g.propagate()


def test_cat_side_piece_is_replaced_in_the_list():
    g = Graph()
    side = g.input("side", B, N, 2)
    c = g.op(aten.cat.default, [g.x, side], 2)
    g.output(c)
    g.propagate()
    pieces = c.args[0]
    assert pieces[0] is g.x and pieces[1].target is torch.ops.tpc.gather_tokens.default


def test_stack_split_unbind_and_getitem():
    g = Graph()
    assert infer(g, g.op(aten.stack.default, [g.x, g.x], dim=0)).axes == {2: T}
    parts = g.op(aten.split.Tensor, g.x, 3, 2)
    assert infer(g, parts).axes == [{1: T}, {1: T}]
    item = g.op(operator.getitem, parts, 1)
    assert infer(g, item, p=(parts, [{1: T}, {1: T}])).axes == {1: T}
    assert infer(g, g.op(aten.unbind.int, g.x, dim=2)).axes == [{1: T}] * C
    assert refusal(g, g.op(aten.chunk.default, g.x, 3, 1)).startswith("splits the token axis into pieces of a fixed size")


def test_a_prefix_token_split_off_the_front_is_followed_and_resized():
    """``split(x, [1, N - 1], dim=1)``: the [CLS] piece is untracked, the rest is the stream from
    token 1 and takes the K - 1 kept tokens after it; a piece reaching past the prefix is refused."""
    g = Graph()
    parts = g.op(aten.split_with_sizes.default, g.x, [1, N - 1], 1)
    assert infer(g, parts).axes == [{}, {1: Axis(1, 1)}]
    assert resize(g, parts) == {"split_sizes": [1, K - 1]}
    assert refusal(g, g.op(aten.split_with_sizes.default, g.x, [2, N - 2], 1)) == "slices tokens [0:2] of 9, which pruning moves"


# --------------------------------------------------------------------------- contractions


def test_linear_and_layer_norm_act_on_the_channels_only():
    g = Graph()
    w = g.input("w", 4, C)
    assert infer(g, g.op(aten.linear.default, g.x, w)).axes == {1: T}
    assert infer(g, g.op(aten.linear.default, input=g.x, weight=w)).axes == {1: T}
    xt = g.op(aten.transpose.int, g.x, 1, 2)
    w9 = g.input("w9", 4, N)
    assert refusal(g, g.op(aten.linear.default, xt, w9), t=(xt, {2: T})) == "mixes tokens together along the token axis"
    assert infer(g, g.op(aten.layer_norm.default, g.x, [C])).axes == {1: T}
    assert "mixes tokens" in refusal(g, g.op(aten.layer_norm.default, g.x, normalized_shape=[N, C]))


def test_batch_norm_per_channel_in_eval_only():
    g = Graph()
    xt = g.op(aten.transpose.int, g.x, 1, 2)  # [B, C, N]: channels on dim 1
    stats = [g.input(n, C) for n in ("w", "b", "m", "v")]
    bn = g.op(aten._native_batch_norm_legit_no_training.default, xt, *stats, 0.1, 1e-5)
    assert infer(g, bn, t=(xt, {2: T})).axes == [{2: T}, None, None]
    training = g.op(aten.batch_norm.default, xt, *stats, True, 0.1, 1e-5, False)
    assert "training mode" in refusal(g, training, t=(xt, {2: T}))


def test_matmul_carries_rows_and_columns_and_contracts_like_layouts():
    g = Graph()
    xt = g.op(aten.transpose.int, g.x, 1, 2)
    tracked = dict(t=(xt, {2: T}))
    for m in (g.op(aten.matmul.default, g.x, xt), g.op(aten.bmm.default, g.x, mat2=xt)):
        out = infer(g, m, **tracked)
        assert out.axes == {1: T, 2: T} and out.gathers == ()
    w = g.input("w", B, N, 3)
    out = infer(g, g.op(aten.bmm.default, xt, w), **tracked)
    assert out.axes == {} and out.gathers == (Gather("mat2", 1, T),)
    assert refusal(g, g.op(aten.bmm.default, xt, w), t=(xt, {2: Axis(1, 1)})) == \
        "contracts the token axis with an operand of another length"


def test_matmul_with_a_side_matrix_of_lower_rank_is_untracked():
    """Regression: the side matrix is unsqueezed before its gather, and the rule then read the
    gathered matrix's token dim (shifted by one) as its columns: ``xᵀ @ W[N, 5]`` was taken to
    carry tokens in its 5 columns and the view after it was refused as a split of 9 tokens."""
    g = Graph()
    xt = g.op(aten.transpose.int, g.x, 1, 2)  # [B, C, N]
    w = g.input("w", N, 5)
    mixed = g.op(aten.matmul.default, xt, w)  # [B, C, 5]: tokens contracted away
    flat = g.op(aten.view.default, mixed, [B, C * 5])
    g.output(flat)
    g.propagate()
    assert mixed.args[1].target is torch.ops.tpc.gather_tokens.default
    assert flat.args == (mixed, [B, C * 5]) and not is_rewritten(flat)


def test_sdpa_aligns_the_mask_to_queries_and_keys_in_either_form():
    g = Graph()
    q, k, v = (g.input(n, B, 3, N, 2) for n in "qkv")
    mask = g.input("mask", B, 1, N, N)
    tracked = {n.name: (n, {2: T}) for n in (q, k, v)}
    expected = (Gather("attn_mask", 2, T), Gather("attn_mask", 3, T))
    for s in (g.op(aten.scaled_dot_product_attention.default, q, k, v, mask),
              g.op(aten.scaled_dot_product_attention.default, q, k, v, attn_mask=mask, scale=0.5)):
        out = infer(g, s, **tracked)
        assert out.axes == {2: T} and out.gathers == expected
    assert "keys and values" in refusal(g, g.op(aten.scaled_dot_product_attention.default, q, k, v),
                                        q=(q, {2: T}), k=(k, {2: T}), v=(v, {2: Axis(1, 1)}))


# --------------------------------------------------------------------------- reductions


def test_reductions_drop_or_keep_the_reduced_dims():
    g = Graph()
    assert infer(g, g.op(aten.mean.dim, g.x, [1])).axes == {}
    assert infer(g, g.op(aten.mean.dim, g.x, [2], True)).axes == {1: T}
    assert infer(g, g.op(aten.sum.dim_IntList, g.x, dim=[0], keepdim=False)).axes == {0: T}
    assert infer(g, g.op(aten.amax.default, g.x, [-1])).axes == {1: T}
    assert infer(g, g.op(aten.var.correction, g.x, [2], correction=1, keepdim=True)).axes == {1: T}
    assert infer(g, g.op(aten.sum.default, g.x)).axes == {}
    assert infer(g, g.op(aten.max.default, g.x)).axes == {}


def test_a_reduction_of_every_dim_with_a_positional_flag_is_untracked():
    """Regression: ``var(x, False)`` (aten.var.default: unbiased, no dims) read its flag as
    ``dim=0`` and tracked tokens on the 0-d result, which then crashed the op that used it."""
    g = Graph()
    spread = g.op(aten.var.default, g.x, False)
    scaled = g.op(aten.mul.Tensor, g.x, spread)
    g.output(scaled)
    g.propagate()
    assert scaled.args == (g.x, spread)


def test_softmax_and_positions_along_tokens():
    g = Graph()
    assert infer(g, g.op(aten._softmax.default, g.x, 1, False)).axes == {1: T}
    assert infer(g, g.op(aten.softmax.int, g.x, dim=-1)).axes == {1: T}
    for positions in (g.op(aten.argmax.default, g.x, 1), g.op(aten.argmax.default, g.x),
                      g.op(aten.max.dim, g.x, 1)):
        assert refusal(g, positions) == "returns positions along the token axis, which pruning renumbers"
    for top in (g.op(aten.max.dim, g.x, 2), g.op(aten.max.dim, g.x, dim=2)):
        assert infer(g, top).axes == [{1: T}, {1: T}]


def test_max_along_channels_with_a_keyword_dim_in_a_graph():
    """Regression: ``max(x, dim=2)`` was taken for a max over every dim, so its values lost the
    token axis and the view after them kept the old token count."""
    g = Graph()
    top = g.op(aten.max.dim, g.x, dim=2)
    values = g.op(operator.getitem, top, 0)
    v = g.op(aten.view.default, values, [B, N, 1])
    g.output(v)
    g.propagate()
    assert v.args == (values, [B, K, 1])


def test_max_pooling_over_tokens_reads_only_the_values():
    """``x.max(dim=1).values`` (max pooling, as sentence-transformers pools) was refused as if its
    positions were read; its values reduce the token axis like ``amax``. Read indices still refuse."""
    g = Graph()
    top = g.op(aten.max.dim, g.x, dim=1)
    values = g.op(operator.getitem, top, 0)
    g.op(operator.getitem, top, 1)  # unread, as export leaves it
    assert infer(g, top).axes == [{}, {}]
    g.output(values)
    g.propagate()
    g = Graph()
    top = g.op(aten.max.dim, g.x, 1, True)
    g.output(g.op(operator.getitem, top, 1))
    assert refusal(g, top) == "returns positions along the token axis, which pruning renumbers"


def test_binary_max_in_a_graph():
    """Regression: ``torch.max(a, b)`` (aten.max.other) was sent to the rule of ``max(x, dim)``,
    which crashed reading ``b`` as a dim."""
    g = Graph()
    top = g.op(aten.max.other, g.x, g.x)
    g.output(top)
    g.propagate()


# --------------------------------------------------------------------------- checks


def test_asserted_metadata_gets_the_new_size_and_no_stride():
    g = Graph()
    for a in (g.op(aten._assert_tensor_metadata.default, g.x, [B, N, C], [N * C, C, 1], torch.float32),
              g.op(aten._assert_tensor_metadata.default, g.x, size=[B, N, C], stride=[N * C, C, 1])):
        assert infer(g, a).axes is None
        assert resize(g, a) == {"stride": None, "size": [B, K, C]}


def test_asserted_metadata_keeps_its_form_in_the_graph():
    g = Graph()
    positional = g.op(aten._assert_tensor_metadata.default, g.x, [B, N, C], [N * C, C, 1], torch.float32)
    keyword = g.op(aten._assert_tensor_metadata.default, g.x, size=[B, N, C], stride=[N * C, C, 1],
                   dtype=torch.float32)
    g.output(g.x)
    g.propagate()
    assert positional.args == (g.x, [B, K, C], None, torch.float32)
    assert keyword.kwargs == {"size": [B, K, C], "dtype": torch.float32}
    assert is_rewritten(positional) and is_rewritten(keyword)


def test_addmm_and_mm_on_a_flattened_stream():
    g = Graph()
    rows = g.input("rows", B * N, C)  # [B·N, C]: batch and tokens flattened into rows
    w, bias = g.input("w", C, 4), g.input("bias", 4)
    tracked = dict(r=(rows, {0: T}))
    assert infer(g, g.op(aten.addmm.default, bias, rows, w), **tracked).axes == {0: T}
    assert infer(g, g.op(aten.addmm.default, bias, mat1=rows, mat2=w, beta=1), **tracked).axes == {0: T}
    assert infer(g, g.op(aten.mm.default, rows, w), **tracked).axes == {0: T}


def test_restore_tokens_untracks_the_full_sequence():
    g = Graph()
    base = g.input("base", B, N, C)
    small = g.input("small", B, K, C)
    restored = g.op(torch.ops.tpc.restore_tokens.default, base, g.index, small)
    assert infer(g, restored, s=(small, {1: T})).axes is None
    assert refusal(g, restored, s=(small, {1: T}), b=(base, {1: T})) == \
        "restores tokens of another layout than the compaction's"


def test_symbol_stand_ins_are_distinct_primes_per_symbol():
    """Shapes are compared at these numbers: a batch s0 and an unbacked u0 must not look alike."""
    import sympy

    from tpc.graph.nodes import stand_in

    names = ["s0", "u0", "s1", "u1", "s12", "u12", "ps0", "zuf3"]
    values = [stand_in(sympy.Symbol(n, positive=True, integer=True)) for n in names]
    assert len(set(values)) == len(values) and all(sympy.isprime(v) and v > 10**6 for v in values)
    assert stand_in(sympy.Symbol("s0", positive=True, integer=True)) == values[0]
