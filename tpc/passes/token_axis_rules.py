"""How the token axis moves through each aten op: the rule table of ``propagate_token_axis``.

A tracked tensor maps each of its dims that carries tokens to an ``Axis``: ``inner`` is the
product of the sizes merged to the right of the token atom in that dim (1 when the dim is
the token axis itself; B when [N·B] was flattened, as nn.MultiheadAttention does) and
``offset`` the number of leading prefix tokens sliced off (``x[:, 1:]``: 1), or minus the
number of tokens put in front after the compaction (CaiT's class token: -1). The first
``prefix - offset`` positions of such a dim hold the same tokens before and after pruning.

A rule reads the *old* shapes (``meta['val']`` from before this compaction), returns the
axes of the node's output (a dict, a list of dicts for tuple outputs, or ``None`` for an
untracked result), and may rewrite the node's shape arguments or ask the context to gather
a side tensor. Anything a rule cannot prove raises ``Refusal``.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass

import torch
from torch import fx

from tpc.graph.nodes import aten, numeric_shape, shape_text, target_packet, val


@dataclass(frozen=True)
class Axis:
    inner: int = 1
    offset: int = 0


class Refusal(Exception):
    """The rule cannot prove the rewrite correct; the message says why."""


INT_MAX = sys.maxsize


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor))
    return out


def _rank(node: fx.Node) -> int:
    return len(val(node).shape)


def _norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


# --------------------------------------------------------------------------- broadcasting


def meet(ctx, node: fx.Node, x: fx.Node, out_rank: int, wanted: dict[int, Axis], what: str = "an operand") -> fx.Node:
    """``x`` right-aligned with an output of ``out_rank`` dims that carries ``wanted`` token axes.

    Where x lacks such an axis but has the old token count there, it is a side tensor (a mask,
    a bias, a stale copy of the stream) and is gathered with the compaction's index; size 1
    broadcasts and is left alone. Returns x or its gathered replacement.
    """
    for o, ax in sorted(wanted.items()):
        d = o - (out_rank - _rank(x))
        if d < 0 or ctx.axes(x).get(d) == ax:
            continue
        size = numeric_shape(x)[d]
        if size == 1:
            continue
        if size != ctx.atom_old(ax) * ax.inner:
            raise Refusal(f"{what} has {size} entries where the stream has {ctx.atom_old(ax)} tokens")
        x = ctx.gather_side(x, d, ax, node)
    return x


def align(ctx, node: fx.Node, args: list[fx.Node], out_rank: int) -> dict[int, Axis]:
    """Right-aligned broadcasting of ``args`` (updated in place) to an output of ``out_rank`` dims."""
    out: dict[int, Axis] = {}
    for a in args:
        off = out_rank - _rank(a)
        for d, ax in ctx.axes(a).items():
            o = d + off
            if o in out and out[o] != ax:
                raise Refusal("combines two token axes of different layouts")
            out[o] = ax
    for i, a in enumerate(args):
        args[i] = meet(ctx, node, a, out_rank, out)
    return out


def _replace_tensor_args(node: fx.Node, old: list[fx.Node], new: list[fx.Node]) -> None:
    mapping = {o: n for o, n in zip(old, new) if o is not n}
    if mapping:
        node.args = fx.node.map_arg(node.args, lambda a: mapping.get(a, a))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: mapping.get(a, a))


def pointwise(ctx, node: fx.Node):
    args = _tensor_args(node)
    new = list(args)
    out = align(ctx, node, new, _rank(node))
    _replace_tensor_args(node, args, new)
    return out


def last_dims_op(count_of):
    """Ops that act on the trailing dims (layer_norm, linear): the token axis must not be there."""

    def rule(ctx, node: fx.Node):
        x = node.args[0]
        rank = _rank(x)
        n = count_of(node)
        axes = ctx.axes(x)
        if any(d >= rank - n for d in axes):
            raise Refusal("mixes tokens together along the token axis")
        return dict(axes)

    return rule


def batch_norm(ctx, node: fx.Node):
    """Batch norm in eval mode is a per-channel affine map on dim 1 (running statistics): it
    carries the token axis unless tokens are the channels. In training mode it would average
    over tokens, so that is refused."""
    x = node.args[0]
    packet = target_packet(node)
    training = node.args[5] if packet is aten.batch_norm else False
    if training:
        raise Refusal("batch norm in training mode averages over the tokens")
    axes = ctx.axes(x)
    if 1 in axes:
        raise Refusal("batch norm whose channels are the token axis")
    return [dict(axes), None, None] if packet is aten._native_batch_norm_legit_no_training else dict(axes)


def softmax(ctx, node: fx.Node):
    return dict(ctx.axes(node.args[0]))


# --------------------------------------------------------------------------- matmul & attention


def _contract(ctx, node, a: fx.Node, da: int, b: fx.Node, db: int):
    """Both sides of a contraction must carry the same token axis (or neither)."""
    ax_a, ax_b = ctx.axes(a).get(da), ctx.axes(b).get(db)
    if ax_a == ax_b:
        return a, b
    if ax_a is not None and ax_b is None:
        return a, _side_or_refuse(ctx, node, b, db, ax_a)
    if ax_b is not None and ax_a is None:
        return _side_or_refuse(ctx, node, a, da, ax_b), b
    raise Refusal("contracts two different token layouts")


def _side_or_refuse(ctx, node, x, d, ax):
    if numeric_shape(x)[d] != ctx.atom_old(ax) * ax.inner:
        raise Refusal("contracts the token axis with an operand of another length")
    return ctx.gather_side(x, d, ax, node)


def matmul(ctx, node: fx.Node):
    a, b = node.args[:2]
    ra, rb = _rank(a), _rank(b)
    if ra < 2 or rb < 2:
        if ctx.axes(a) or ctx.axes(b):
            raise Refusal("a vector matmul over the token axis")
        return None
    a2, b2 = _contract(ctx, node, a, ra - 1, b, rb - 2)
    out_rank = _rank(node)
    out: dict[int, Axis] = {}
    if ra - 2 in ctx.axes(a2):
        out[out_rank - 2] = ctx.axes(a2)[ra - 2]
    if rb - 1 in ctx.axes(b2):
        out[out_rank - 1] = ctx.axes(b2)[rb - 1]
    for x, r in ((a2, ra), (b2, rb)):
        for d, ax in ctx.axes(x).items():
            if d < r - 2:
                out[d + out_rank - r] = ax
    node.args = (a2, b2, *node.args[2:])
    return out


def addmm(ctx, node: fx.Node):
    bias, a, b = node.args[:3]
    a2, b2 = _contract(ctx, node, a, 1, b, 0)
    out = {}
    if 0 in ctx.axes(a2):
        out[0] = ctx.axes(a2)[0]
    if 1 in ctx.axes(b2):
        out[1] = ctx.axes(b2)[1]
    if ctx.axes(bias) and any(ctx.axes(bias).get(d + 2 - _rank(bias)) != ax for d, ax in out.items()):
        raise Refusal("the bias of addmm is tracked differently from the product")
    node.args = (bias, a2, b2, *node.args[3:])
    return out


def sdpa(ctx, node: fx.Node):
    q, k, v = node.args[:3]
    rq = _rank(q)
    k2, v2 = k, v
    ak, av = ctx.axes(k).get(rq - 2), ctx.axes(v).get(rq - 2)
    if ak != av:
        if ak is not None and av is None:
            v2 = _side_or_refuse(ctx, node, v, rq - 2, ak)
        elif av is not None and ak is None:
            k2 = _side_or_refuse(ctx, node, k, rq - 2, av)
        else:
            raise Refusal("keys and values carry different token layouts")
    if (rq - 1) in ctx.axes(q) or (rq - 1) in ctx.axes(k2) or (rq - 1) in ctx.axes(v2):
        raise Refusal("the token axis is the head dimension")
    out: dict[int, Axis] = {}
    for x in (q, k2, v2):
        for d, ax in ctx.axes(x).items():
            if d < rq - 2:
                if out.get(d, ax) != ax:
                    raise Refusal("q, k and v disagree on a batch dimension")
                out[d] = ax
    q_ax = ctx.axes(q).get(rq - 2)
    kv_ax = ctx.axes(k2).get(rq - 2)
    if q_ax is not None:
        out[rq - 2] = q_ax
    args = list(node.args)
    args[1:3] = [k2, v2]
    mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        mask2 = _align_mask(ctx, node, mask, rq, out, q_ax, kv_ax)
        if len(args) > 3:
            args[3] = mask2
        else:
            node.kwargs = {**node.kwargs, "attn_mask": mask2}
    node.args = tuple(args)
    return out


def _align_mask(ctx, node, mask: fx.Node, rank: int, batch_axes: dict, q_ax, kv_ax) -> fx.Node:
    want = {d: ax for d, ax in batch_axes.items() if d < rank - 2}
    if q_ax is not None:
        want[rank - 2] = q_ax
    if kv_ax is not None:
        want[rank - 1] = kv_ax
    mask = meet(ctx, node, mask, rank, want, "the attention mask")
    off = rank - _rank(mask)
    if set(ctx.axes(mask)) - {o - off for o in want}:
        raise Refusal("the attention mask carries tokens where the attention has none")
    return mask


# --------------------------------------------------------------------------- layout ops


def _stride(shape, d):
    return math.prod(shape[d + 1:])


def map_reshape(ctx, node: fx.Node, in_shape, out_shape, in_axes) -> dict[int, Axis]:
    """Where each token atom lands in a row-major reshape, by its stride in the flat index."""
    out: dict[int, Axis] = {}
    for d, ax in in_axes.items():
        atom = ctx.atom_old(ax)
        stride = _stride(in_shape, d) * ax.inner
        for j in range(len(out_shape)):
            t = _stride(out_shape, j)
            if t <= stride and stride % t == 0 and stride * atom <= t * out_shape[j] and (t * out_shape[j]) % (stride * atom) == 0:
                out[j] = Axis(stride // t, ax.offset)
                break
        else:
            raise Refusal(
                f"splits the {atom} tokens into {shape_text(node)} (a reshape back to a grid), "
                "and after pruning there is no full token grid"
            )
    return out


def _rewrite_sizes(ctx, sizes: list, axes_at: dict[int, Axis], old_sizes, first: int = 0) -> list:
    """New size arguments: int sizes scaled by new/old token counts, symbolic ones set to -1."""
    sizes = list(sizes)
    for j, ax in axes_at.items():
        i = j - first
        if not 0 <= i < len(sizes):
            continue
        s = sizes[i]
        if isinstance(s, int):
            if s != -1:
                sizes[i] = s // ctx.atom_old(ax) * ctx.atom_new(ax)
            continue
        others = [t for t in range(len(sizes)) if t != i and sizes[t] == -1]
        for t in others:
            fixed = old_sizes[t + first]
            if not isinstance(fixed, int):
                raise Refusal("a reshape with two symbolic sizes next to the token axis")
            sizes[t] = fixed
        sizes[i] = -1
    return sizes


def reshape(ctx, node: fx.Node):
    x = node.args[0]
    out = map_reshape(ctx, node, numeric_shape(x), numeric_shape(node), ctx.axes(x))
    packet = target_packet(node)
    old_sizes = list(val(node).shape)
    if packet in (aten.view, aten.reshape, aten._unsafe_view):
        new_sizes = _rewrite_sizes(ctx, node.args[1], out, old_sizes)
        if new_sizes != list(node.args[1]):
            node.args = (x, new_sizes, *node.args[2:])
            ctx.mark_rewritten(node)
    elif packet is aten.unflatten:
        dim = _norm_dim(node.args[1], _rank(x))
        new_sizes = _rewrite_sizes(ctx, node.args[2], out, old_sizes, first=dim)
        if new_sizes != list(node.args[2]):
            node.args = (x, node.args[1], new_sizes)
            ctx.mark_rewritten(node)
    return out


def reshape_as(ctx, node: fx.Node):
    """``x.reshape_as(y)`` takes its sizes from y at run time: fine when y carries the tokens
    where the reshape puts x's (LeViT: ``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    x, like = node.args[:2]
    out = map_reshape(ctx, node, numeric_shape(x), numeric_shape(node), ctx.axes(x))
    if ctx.axes(like) != out:
        raise Refusal("reshapes the tokens to the shape of a tensor that holds them elsewhere")
    return out


def permute(ctx, node: fx.Node):
    x = node.args[0]
    rank = _rank(x)
    packet = target_packet(node)
    if packet is aten.permute:
        perm = [_norm_dim(p, rank) for p in node.args[1]]
    elif packet is aten.t:
        perm = [1, 0][:rank]
    elif packet is aten.movedim:
        src = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dst = node.args[2] if isinstance(node.args[2], (list, tuple)) else [node.args[2]]
        src = [_norm_dim(s, rank) for s in src]
        dst = [_norm_dim(s, rank) for s in dst]
        perm = [None] * rank
        for s, t in zip(src, dst):
            perm[t] = s
        rest = iter(i for i in range(rank) if i not in src)
        perm = [p if p is not None else next(rest) for p in perm]
    else:  # transpose
        perm = list(range(rank))
        a, b = (_norm_dim(d, rank) for d in node.args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
    axes = ctx.axes(x)
    return {i: axes[p] for i, p in enumerate(perm) if p in axes}


def expand(ctx, node: fx.Node):
    x = node.args[0]
    sizes = list(node.args[1])
    off = len(sizes) - _rank(x)
    out = {d + off: ax for d, ax in ctx.axes(x).items()}
    new_sizes = _rewrite_sizes(ctx, sizes, out, list(val(node).shape))
    if new_sizes != sizes:
        node.args = (x, new_sizes, *node.args[2:])
        ctx.mark_rewritten(node)
    return out


def select(ctx, node: fx.Node):
    x, dim, index = node.args[:3]
    rank = _rank(x)
    dim = _norm_dim(dim, rank)
    axes = ctx.axes(x)
    if dim in axes:
        ax = axes[dim]
        old = ctx.atom_old(ax)
        idx = index + old if isinstance(index, int) and index < 0 else index
        if ax.inner != 1 or not isinstance(idx, int) or idx >= ctx.prefix - ax.offset:
            raise Refusal(
                f"reads token {index} on its own, and only the {ctx.prefix} prefix token(s) are kept in place"
            )
    return {d - (d > dim): ax for d, ax in axes.items() if d != dim}


def slice_(ctx, node: fx.Node):
    x = node.args[0]
    rank = _rank(x)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank)
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    axes = dict(ctx.axes(x))
    if dim not in axes:
        return axes
    ax = axes[dim]
    old = ctx.atom_old(ax)
    start = 0 if start is None else start
    end = INT_MAX if end is None else end
    if not (isinstance(start, int) and isinstance(end, int)) or step != 1 or ax.inner != 1:
        raise Refusal("a strided or symbolic slice of the token axis")
    start = start + old if start < 0 else start
    end = end + old if end < 0 else end
    if end >= old and start == 0:
        return axes
    if end >= old and 0 < start <= ctx.prefix - ax.offset:
        axes[dim] = Axis(1, ax.offset + start)
        if end != INT_MAX:
            node.args = (x, node.args[1], node.args[2], INT_MAX, *node.args[4:])
            ctx.mark_rewritten(node)
        return axes
    if 0 <= start and end <= ctx.prefix - ax.offset:
        del axes[dim]
        return axes
    raise Refusal(f"slices tokens [{start}:{end}] of {old}, which pruning moves")


def _dims_arg(node: fx.Node, index: int, name: str):
    dims = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    if dims is None:
        return None
    return [dims] if isinstance(dims, int) else list(dims)


_REDUCTIONS = {
    # op: (dims index, keepdim index)
    aten.sum: (1, 2), aten.mean: (1, 2), aten.amax: (1, 2), aten.amin: (1, 2),
    aten.logsumexp: (1, 2), aten.any: (1, 2), aten.all: (1, 2), aten.prod: (1, 2),
    aten.var: (1, 3), aten.std: (1, 3), aten.linalg_vector_norm: (2, 3), aten.norm: (2, 3),
}


def reduction(ctx, node: fx.Node):
    x = node.args[0]
    rank = _rank(x)
    index, keep_index = _REDUCTIONS[target_packet(node)]
    dims = _dims_arg(node, index, "dim")
    if not dims:
        dims = list(range(rank))
    dims = {_norm_dim(d, rank) for d in dims}
    keepdim = bool(node.args[keep_index] if len(node.args) > keep_index else node.kwargs.get("keepdim", False))
    out = {}
    for d, ax in ctx.axes(x).items():
        if d in dims:
            continue
        out[d if keepdim else d - sum(1 for r in dims if r < d)] = ax
    return out


def arg_reduction(ctx, node: fx.Node):
    x = node.args[0]
    dims = _dims_arg(node, 1, "dim")
    rank = _rank(x)
    axes = ctx.axes(x)
    if dims is None or any(_norm_dim(d, rank) in axes for d in dims):
        raise Refusal("returns positions along the token axis, which pruning renumbers")
    dim = _norm_dim(dims[0], rank)
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    out = {d if keepdim else d - (d > dim): ax for d, ax in axes.items()}
    return [out, out] if target_packet(node) in (aten.max, aten.min) else out


def split(ctx, node: fx.Node):
    x = node.args[0]
    rank = _rank(x)
    packet = target_packet(node)
    dim = _norm_dim(node.args[1] if packet is aten.unbind and len(node.args) > 1 else
                    (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)), rank)
    axes = ctx.axes(x)
    if dim in axes:
        raise Refusal("splits the sequence along the token axis")
    if packet is aten.unbind:
        part = {d - (d > dim): ax for d, ax in axes.items()}
    else:
        part = dict(axes)
    return [part] * len(val(node))


def cat(ctx, node: fx.Node):
    tensors = list(node.args[0])
    rank = _rank(node)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank)
    stack = target_packet(node) is aten.stack
    if not stack and any(dim in ctx.axes(t) for t in tensors):
        return _cat_in_front(ctx, node, tensors, dim)
    if stack:
        shifted = []
        for t in tensors:
            shifted.append({d + (d >= dim): ax for d, ax in ctx.axes(t).items()})
        out = {}
        for s in shifted:
            out.update(s)
        if any(s != out for s in shifted):
            raise Refusal("stacks tensors with different token layouts")
        return out
    new = list(tensors)
    out = align(ctx, node, new, rank)
    if new != tensors:
        node.args = (new, *node.args[1:])
    return out


def _cat_in_front(ctx, node: fx.Node, tensors: list[fx.Node], dim: int):
    """``cat([front…, x], dim=tokens)``: tokens that pruning does not touch, put in front of the stream.

    Two forms meet here. Rotary ViTs (EVA-02) rotate only the patch tokens ``x[:, P:]`` and
    join the prefix ``x[:, :P]`` back in front; CaiT puts its class token in front of the patch
    tokens after the self-attention blocks. Untracked front pieces of ``f`` tokens before the one
    tracked piece (offset ``o``) give a token axis of offset ``o - f``: its first ``prefix - o + f``
    positions are the same tokens before and after pruning, the rest follow the kept tokens.
    """
    *front, last = tensors
    ax = ctx.axes(last).get(dim)
    if ax is None or ax.inner != 1 or any(dim in ctx.axes(t) for t in front):
        raise Refusal("concatenates along the token axis")
    rank = _rank(node)
    wanted = {d: a for d, a in ctx.axes(last).items() if d != dim}
    new = [meet(ctx, node, t, rank, wanted) for t in front] + [last]
    if new != tensors:
        node.args = (new, *node.args[1:])
    return {**wanted, dim: Axis(1, ax.offset - sum(numeric_shape(t)[dim] for t in front))}


def getitem(ctx, node: fx.Node):
    parts = ctx.axes_raw(node.args[0])
    if isinstance(parts, list):
        return parts[node.args[1]]
    raise Refusal("indexing a tracked tensor with getitem")


def same_shape(ctx, node: fx.Node):
    return dict(ctx.axes(node.args[0]))


def fresh_tensor(ctx, node: fx.Node):
    """new_zeros(x, size) and friends read only x's dtype/device: the result is untracked."""
    return None


def sym_size(ctx, node: fx.Node):
    dim = _norm_dim(node.args[1], _rank(node.args[0]))
    if dim in ctx.axes(node.args[0]):
        raise Refusal("reads the token count as a number")
    return None


def assert_metadata(ctx, node: fx.Node):
    """``_assert_tensor_metadata(x, size?, stride?, dtype?)``, which torch.export emits for ``.to()``:
    a check with no output. A size it asserts is rewritten like a reshape's; a stride across the
    token axis is dropped (the new strides follow from the new sizes), the dtype and device checks stay."""
    x = node.args[0]
    axes = ctx.axes(x)
    args = list(node.args) + [None] * (3 - len(node.args))
    kwargs = dict(node.kwargs)
    size = kwargs.get("size", args[1])
    if size is not None and axes:
        new = _rewrite_sizes(ctx, size, axes, list(val(x).shape))
        if "size" in kwargs:
            kwargs["size"] = new
        else:
            args[1] = new
    if axes and (kwargs.get("stride", args[2]) is not None):
        kwargs.pop("stride", None)
        args[2] = None
    args = tuple(args[:len(node.args)])
    if args != tuple(node.args) or kwargs != dict(node.kwargs):
        node.args, node.kwargs = args, kwargs
        ctx.mark_rewritten(node)
    return None


def assert_value(ctx, node: fx.Node):
    """``_assert_async(cond)`` and its functional form: a check on values, with no token-shaped output."""
    return None


def embedding(ctx, node: fx.Node):
    weight, ids = node.args[:2]
    if ctx.axes(weight):
        raise Refusal("an embedding table indexed along the token axis")
    return dict(ctx.axes(ids))


_EXPLICIT = {
    aten.softmax: softmax, aten._softmax: softmax, aten.log_softmax: softmax, aten._log_softmax: softmax,
    aten.layer_norm: last_dims_op(lambda n: len(n.args[1])),
    aten.batch_norm: batch_norm, aten._native_batch_norm_legit_no_training: batch_norm,
    aten.rms_norm: last_dims_op(lambda n: len(n.args[1])),
    aten.linear: last_dims_op(lambda n: 1),
    aten.matmul: matmul, aten.bmm: matmul, aten.mm: matmul, aten.addmm: addmm,
    aten.scaled_dot_product_attention: sdpa,
    aten.view: reshape, aten.reshape: reshape, aten._unsafe_view: reshape, aten.flatten: reshape,
    aten.unflatten: reshape, aten.squeeze: reshape, aten.unsqueeze: reshape, aten.reshape_as: reshape_as,
    aten.permute: permute, aten.transpose: permute, aten.t: permute, aten.movedim: permute,
    aten.expand: expand,
    aten.select: select, aten.slice: slice_,
    aten.max: arg_reduction, aten.min: arg_reduction, aten.argmax: arg_reduction, aten.argmin: arg_reduction,
    aten.unbind: split, aten.split: split, aten.split_with_sizes: split, aten.chunk: split,
    aten.cat: cat, aten.stack: cat,
    aten.clone: same_shape, aten.contiguous: same_shape, aten.alias: same_shape, aten.detach: same_shape,
    aten._to_copy: same_shape, aten.to: same_shape, aten.type_as: pointwise, aten.dropout: same_shape,
    aten.zeros_like: same_shape, aten.ones_like: same_shape, aten.empty_like: same_shape,
    aten.full_like: same_shape, aten.lift_fresh_copy: same_shape,
    aten.masked_fill: pointwise, aten.where: pointwise,
    aten.hardswish: pointwise,  # elementwise, but not tagged pointwise in torch
    aten.new_zeros: fresh_tensor, aten.new_ones: fresh_tensor, aten.new_empty: fresh_tensor,
    aten.new_full: fresh_tensor,
    aten.sym_size: sym_size,
    aten.embedding: embedding,
    aten._assert_tensor_metadata: assert_metadata,
    aten._assert_async: assert_value, aten._functional_assert_async: assert_value,
    operator.getitem: getitem,
}
_EXPLICIT.update({op: reduction for op in _REDUCTIONS})


def restore(ctx, node: fx.Node):
    """tpc.restore_tokens puts the kept rows back into the full sequence: the result is untracked."""
    base, _index, src = node.args
    if ctx.axes(base) or set(ctx.axes(src)) - {1} or ctx.axes(src).get(1, Axis()) != Axis():
        raise Refusal("restores tokens of another layout than the compaction's")
    return None


_EXPLICIT[torch.ops.tpc.restore_tokens] = restore


def rule_for(node: fx.Node):
    packet = target_packet(node)
    if packet in _EXPLICIT:
        if packet in (aten.max, aten.min) and len(node.args) < 2:
            return reduction_all
        return _EXPLICIT[packet]
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return pointwise
    return None


def reduction_all(ctx, node: fx.Node):
    return None
