"""How the token axis moves through each aten op: the rule table of ``propagate_token_axis``.

A tracked tensor maps each of its dims that carries tokens to an ``Axis``: ``inner`` is the
product of the sizes merged to the right of the token atom in that dim (1 when the dim is
the token axis itself; B when [N·B] was flattened, as nn.MultiheadAttention does) and
``offset`` the number of leading prefix tokens sliced off (``x[:, 1:]``: 1), or minus the
number of tokens put in front after the compaction (CaiT's class token: -1). The first
``prefix - offset`` positions of such a dim hold the same tokens before and after pruning.

``RULES`` maps an ``OpOverload`` (``aten.view.default``) to a :class:`Rule` of two functions,
as PyTorch DTensor's view-op rules map an op to its dim map. Both read the node's arguments by
schema name (:func:`arguments`: positional and keyword forms alike, defaults filled in) and
the *old* shapes (``meta['val']`` from before this compaction):

- ``infer(ctx, node, args) -> Inferred``: where the token axis is after the op (a dict
  ``{dim: Axis}``, a list of them for tuple outputs, or ``None`` for an untracked result), and
  which operands are side tensors to gather with the kept index (``Gather``). It changes
  nothing; anything it cannot prove raises ``Refusal``.
- ``resize(ctx, node, args, axes) -> {argument: value}``: the op's size arguments for the
  new token count (``reshape(x, [B, 197, 384])`` -> ``[B, 99, 384]``), given the inferred axes.

An op tagged ``pointwise`` without an entry broadcasts (``POINTWISE``); any other op that
reads a tracked tensor has no rule, and propagation refuses it.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from tpc.graph.nodes import PASS_THROUGH, aten, numeric_shape, shape_text, val


@dataclass(frozen=True)
class Axis:
    inner: int = 1
    offset: int = 0


class Refusal(Exception):
    """The rule cannot prove the rewrite correct; the message says why."""


INT_MAX = sys.maxsize


# --------------------------------------------------------------------------- arguments


def arguments(node: fx.Node) -> dict:
    """The node's arguments by schema name (``self`` is ``input``), defaults filled in."""
    if node.target is operator.getitem:
        return dict(zip(("input", "index"), node.args))
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if bound is None:
        raise TypeError(f"the arguments of {node.format_node()} do not fit the schema of {node.target}")
    return bound.kwargs


def set_argument(node: fx.Node, key, value) -> None:
    """Write argument ``key`` (a schema name, or ``(name, i)`` for item i of a list argument)
    where the node has it: at its position, or as a keyword. ``None`` removes a keyword."""
    name, item = key if isinstance(key, tuple) else (key, None)
    schema_args = node.target._schema.arguments
    i = [("input" if a.name == "self" else a.name) for a in schema_args].index(name)
    if item is not None:
        items = list(node.args[i] if i < len(node.args) else node.kwargs[schema_args[i].name])
        items[item] = value
        value = items
    if i < len(node.args):
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    elif value is None:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != schema_args[i].name}
    else:
        node.kwargs = {**node.kwargs, schema_args[i].name: value}


def operands(args: dict) -> list[tuple[object, fx.Node]]:
    """The tensor operands among ``args``, in schema order, each with its key for ``set_argument``."""
    out = []
    for name, a in args.items():
        if isinstance(a, (list, tuple)):
            out.extend(((name, i), x) for i, x in enumerate(a) if _is_tensor(x))
        elif _is_tensor(a):
            out.append((name, a))
    return out


def _is_tensor(x) -> bool:
    return isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor)


def _rank(node: fx.Node) -> int:
    return len(val(node).shape)


def _norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _dims(dims) -> list[int] | None:
    return None if dims is None else [dims] if isinstance(dims, int) else list(dims)


# --------------------------------------------------------------------------- the table's types


@dataclass(frozen=True)
class Gather:
    """Operand ``arg`` is a side tensor: gather it along its ``dim`` with the kept index, as the
    stream's ``axis`` there (an attention mask, a position bias, a stale copy of the stream)."""

    arg: object
    dim: int
    axis: Axis


@dataclass(frozen=True)
class Inferred:
    axes: object  # {dim: Axis}, a list of those for a tuple output, or None (untracked)
    gathers: tuple[Gather, ...] = ()


@dataclass(frozen=True)
class Rule:
    infer: Callable[..., Inferred]
    resize: Callable[..., dict] | None = None


# --------------------------------------------------------------------------- broadcasting


def meet(ctx, node: fx.Node, key, x: fx.Node, out_rank: int, wanted: dict[int, Axis],
         what: str = "an operand") -> list[Gather]:
    """The gathers that make operand ``x`` carry ``wanted`` token axes, right-aligned with an
    output of ``out_rank`` dims.

    Where x lacks such an axis but has the old token count there, it is a side tensor (a mask,
    a bias, a stale copy of the stream) and is gathered with the compaction's index; size 1
    broadcasts and is left alone.
    """
    have = dict(ctx.axes(x))
    gathers = []
    for o, ax in sorted(wanted.items()):
        d = o - (out_rank - _rank(x))
        if d < 0 or have.get(d) == ax:
            continue
        size = numeric_shape(x)[d]
        if size == 1:
            continue
        if size != ctx.atom_old(ax) * ax.inner:
            raise Refusal(f"{what} has {size} entries where the stream has {ctx.atom_old(ax)} tokens")
        ctx.check_side(x, d, ax, node)
        gathers.append(Gather(key, d, ax))
        have[d] = ax
    return gathers


def align(ctx, node: fx.Node, tensors: list[tuple[object, fx.Node]], out_rank: int) -> Inferred:
    """Right-aligned broadcasting of ``tensors`` to an output of ``out_rank`` dims."""
    out: dict[int, Axis] = {}
    for _, a in tensors:
        off = out_rank - _rank(a)
        for d, ax in ctx.axes(a).items():
            o = d + off
            if o in out and out[o] != ax:
                raise Refusal("combines two token axes of different layouts")
            out[o] = ax
    gathers = [g for key, a in tensors for g in meet(ctx, node, key, a, out_rank, out)]
    return Inferred(out, tuple(gathers))


def pointwise(ctx, node: fx.Node, args: dict) -> Inferred:
    return align(ctx, node, operands(args), _rank(node))


def same_axes(ctx, node: fx.Node, args: dict) -> Inferred:
    """The output has the shape and token axes of ``input``: the pass-through ops (a cast, a copy,
    dropout), ``zeros_like`` and friends, softmax (along the token axis it normalises over the kept
    tokens, as attention over the kept keys should)."""
    return Inferred(dict(ctx.axes(args["input"])))


def untracked(ctx, node: fx.Node, args: dict) -> Inferred:
    """No token-shaped output: ``new_zeros(x, size)`` reads only x's dtype and device, an
    ``_assert_async`` checks values."""
    return Inferred(None)


def last_dims(count_of: Callable[[dict], int]):
    """Ops that act on the trailing dims (layer_norm, linear): the token axis must not be there."""

    def infer(ctx, node: fx.Node, args: dict) -> Inferred:
        x = args["input"]
        axes = ctx.axes(x)
        if any(d >= _rank(x) - count_of(args) for d in axes):
            raise Refusal("mixes tokens together along the token axis")
        return Inferred(dict(axes))

    return infer


def batch_norm(ctx, node: fx.Node, args: dict) -> Inferred:
    """Batch norm in eval mode is a per-channel affine map on dim 1 (running statistics): it
    carries the token axis unless tokens are the channels. In training mode it would average
    over tokens, so that is refused."""
    if args.get("training", False):
        raise Refusal("batch norm in training mode averages over the tokens")
    axes = ctx.axes(args["input"])
    if 1 in axes:
        raise Refusal("batch norm whose channels are the token axis")
    return Inferred([dict(axes), None, None] if isinstance(val(node), (list, tuple)) else dict(axes))


# --------------------------------------------------------------------------- matmul & attention


def _contract(ctx, node, a, da: int, b, db: int) -> tuple[list[Gather], dict, dict]:
    """Both sides ``(key, x)`` of a contraction over ``a``'s dim ``da`` and ``b``'s dim ``db``
    must carry the same token axis (or neither): the side that lacks it is gathered.
    Returns the gathers and both sides' axes after them."""
    (ka, xa), (kb, xb) = a, b
    axes_a, axes_b = dict(ctx.axes(xa)), dict(ctx.axes(xb))
    ax_a, ax_b = axes_a.get(da), axes_b.get(db)
    if ax_a == ax_b:
        return [], axes_a, axes_b
    if ax_a is not None and ax_b is None:
        axes_b[db] = ax_a
        return [_side_or_refuse(ctx, node, kb, xb, db, ax_a)], axes_a, axes_b
    if ax_b is not None and ax_a is None:
        axes_a[da] = ax_b
        return [_side_or_refuse(ctx, node, ka, xa, da, ax_b)], axes_a, axes_b
    raise Refusal("contracts two different token layouts")


def _side_or_refuse(ctx, node, key, x, d, ax) -> Gather:
    if numeric_shape(x)[d] != ctx.atom_old(ax) * ax.inner:
        raise Refusal("contracts the token axis with an operand of another length")
    ctx.check_side(x, d, ax, node)
    return Gather(key, d, ax)


def matmul(ctx, node: fx.Node, args: dict) -> Inferred:
    """matmul, mm, bmm: ``a[…, m, k] @ b[…, k, n]``; tokens may be m, n, k or a batch dim."""
    a, b = operands(args)[:2]
    ra, rb = _rank(a[1]), _rank(b[1])
    if ra < 2 or rb < 2:
        if ctx.axes(a[1]) or ctx.axes(b[1]):
            raise Refusal("a vector matmul over the token axis")
        return Inferred(None)
    gathers, axes_a, axes_b = _contract(ctx, node, a, ra - 1, b, rb - 2)
    out_rank = _rank(node)
    out: dict[int, Axis] = {}
    if ra - 2 in axes_a:
        out[out_rank - 2] = axes_a[ra - 2]
    if rb - 1 in axes_b:
        out[out_rank - 1] = axes_b[rb - 1]
    for axes, r in ((axes_a, ra), (axes_b, rb)):
        for d, ax in axes.items():
            if d < r - 2:
                out[d + out_rank - r] = ax
    return Inferred(out, tuple(gathers))


def addmm(ctx, node: fx.Node, args: dict) -> Inferred:
    """``input + mat1 @ mat2`` (2-D)."""
    bias = args["input"]
    gathers, axes_a, axes_b = _contract(ctx, node, ("mat1", args["mat1"]), 1, ("mat2", args["mat2"]), 0)
    out = {}
    if 0 in axes_a:
        out[0] = axes_a[0]
    if 1 in axes_b:
        out[1] = axes_b[1]
    if ctx.axes(bias) and any(ctx.axes(bias).get(d + 2 - _rank(bias)) != ax for d, ax in out.items()):
        raise Refusal("the bias of addmm is tracked differently from the product")
    return Inferred(out, tuple(gathers))


def sdpa(ctx, node: fx.Node, args: dict) -> Inferred:
    """Queries keep their token axis; keys and values must agree on theirs; the mask is aligned
    to both (gathered along queries and keys where it is a side tensor)."""
    q, k, v = args["query"], args["key"], args["value"]
    rq = _rank(q)
    axes_k, axes_v = dict(ctx.axes(k)), dict(ctx.axes(v))
    ak, av = axes_k.get(rq - 2), axes_v.get(rq - 2)
    gathers = []
    if ak != av:
        if ak is not None and av is None:
            gathers.append(_side_or_refuse(ctx, node, "value", v, rq - 2, ak))
            axes_v[rq - 2] = ak
        elif av is not None and ak is None:
            gathers.append(_side_or_refuse(ctx, node, "key", k, rq - 2, av))
            axes_k[rq - 2] = av
        else:
            raise Refusal("keys and values carry different token layouts")
    if (rq - 1) in ctx.axes(q) or (rq - 1) in axes_k or (rq - 1) in axes_v:
        raise Refusal("the token axis is the head dimension")
    out: dict[int, Axis] = {}
    for axes in (ctx.axes(q), axes_k, axes_v):
        for d, ax in axes.items():
            if d < rq - 2:
                if out.get(d, ax) != ax:
                    raise Refusal("q, k and v disagree on a batch dimension")
                out[d] = ax
    q_ax = ctx.axes(q).get(rq - 2)
    kv_ax = axes_k.get(rq - 2)
    if q_ax is not None:
        out[rq - 2] = q_ax
    mask = args.get("attn_mask")
    if isinstance(mask, fx.Node):
        gathers += _align_mask(ctx, node, mask, rq, out, q_ax, kv_ax)
    return Inferred(out, tuple(gathers))


def _align_mask(ctx, node, mask: fx.Node, rank: int, batch_axes: dict, q_ax, kv_ax) -> list[Gather]:
    want = {d: ax for d, ax in batch_axes.items() if d < rank - 2}
    if q_ax is not None:
        want[rank - 2] = q_ax
    if kv_ax is not None:
        want[rank - 1] = kv_ax
    gathers = meet(ctx, node, "attn_mask", mask, rank, want, "the attention mask")
    off = rank - _rank(mask)
    if set(ctx.axes(mask)) - {o - off for o in want}:
        raise Refusal("the attention mask carries tokens where the attention has none")
    return gathers


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
            if (t <= stride and stride % t == 0 and stride * atom <= t * out_shape[j]
                    and (t * out_shape[j]) % (stride * atom) == 0):
                out[j] = Axis(stride // t, ax.offset)
                break
        else:
            raise Refusal(
                f"splits the {atom} tokens into {shape_text(node)} (a reshape back to a grid), "
                "and after pruning there is no full token grid"
            )
    return out


def reshape(ctx, node: fx.Node, args: dict) -> Inferred:
    """view, reshape, flatten, unflatten, (un)squeeze: the token atom followed by its stride."""
    x = args["input"]
    return Inferred(map_reshape(ctx, node, numeric_shape(x), numeric_shape(node), ctx.axes(x)))


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


def resize_sizes(name: str):
    """The resize of an op whose argument ``name`` lists every output size (view, reshape, expand)."""

    def resize(ctx, node: fx.Node, args: dict, axes: dict) -> dict:
        return {name: _rewrite_sizes(ctx, args[name], axes, list(val(node).shape))}

    return resize


def resize_unflatten(ctx, node: fx.Node, args: dict, axes: dict) -> dict:
    """``unflatten(x, dim, sizes)``: ``sizes`` are the output sizes from ``dim`` on."""
    first = _norm_dim(args["dim"], _rank(args["input"]))
    return {"sizes": _rewrite_sizes(ctx, args["sizes"], axes, list(val(node).shape), first=first)}


def reshape_as(ctx, node: fx.Node, args: dict) -> Inferred:
    """``x.reshape_as(y)`` takes its sizes from y at run time: fine when y carries the tokens
    where the reshape puts x's (LeViT: ``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    x, like = args["input"], args["other"]
    out = map_reshape(ctx, node, numeric_shape(x), numeric_shape(node), ctx.axes(x))
    if ctx.axes(like) != out:
        raise Refusal("reshapes the tokens to the shape of a tensor that holds them elsewhere")
    return Inferred(out)


def _permutation(node: fx.Node, args: dict, rank: int) -> list[int]:
    """Output dim i is input dim perm[i]."""
    op = node.target
    if op is aten.permute.default:
        return [_norm_dim(p, rank) for p in args["dims"]]
    if op is aten.t.default:
        return [1, 0][:rank]
    if op in (aten.movedim.int, aten.movedim.intlist):
        src = [_norm_dim(s, rank) for s in _dims(args["source"])]
        dst = [_norm_dim(s, rank) for s in _dims(args["destination"])]
        perm = [None] * rank
        for s, t in zip(src, dst):
            perm[t] = s
        rest = iter(i for i in range(rank) if i not in src)
        return [p if p is not None else next(rest) for p in perm]
    perm = list(range(rank))  # transpose
    a, b = _norm_dim(args["dim0"], rank), _norm_dim(args["dim1"], rank)
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def permute(ctx, node: fx.Node, args: dict) -> Inferred:
    """permute, transpose, t, movedim: token axes move with their dims."""
    x = args["input"]
    axes = ctx.axes(x)
    return Inferred({i: axes[p] for i, p in enumerate(_permutation(node, args, _rank(x))) if p in axes})


def expand(ctx, node: fx.Node, args: dict) -> Inferred:
    x = args["input"]
    off = len(args["size"]) - _rank(x)
    return Inferred({d + off: ax for d, ax in ctx.axes(x).items()})


def select(ctx, node: fx.Node, args: dict) -> Inferred:
    """``x[:, i]``: only a prefix token, which pruning keeps in place, may be read on its own."""
    x, index = args["input"], args["index"]
    dim = _norm_dim(args["dim"], _rank(x))
    axes = ctx.axes(x)
    if dim in axes:
        ax = axes[dim]
        old = ctx.atom_old(ax)
        idx = index + old if isinstance(index, int) and index < 0 else index
        if ax.inner != 1 or not isinstance(idx, int) or idx >= ctx.prefix - ax.offset:
            raise Refusal(
                f"reads token {index} on its own, and only the {ctx.prefix} prefix token(s) are kept in place"
            )
    return Inferred({d - (d > dim): ax for d, ax in axes.items() if d != dim})


def _slice_bounds(ctx, args: dict, ax: Axis) -> tuple[int, int]:
    start, end, step = args["start"], args["end"], args["step"]
    start = 0 if start is None else start
    end = INT_MAX if end is None else end
    if not (isinstance(start, int) and isinstance(end, int)) or step != 1 or ax.inner != 1:
        raise Refusal("a strided or symbolic slice of the token axis")
    old = ctx.atom_old(ax)
    return (start + old if start < 0 else start), (end + old if end < 0 else end)


def slice_(ctx, node: fx.Node, args: dict) -> Inferred:
    """``x[:, a:b]`` of the token axis: all tokens, all but some prefix tokens (their count
    becomes the axis' offset), or prefix tokens only (untracked). Anything else is refused."""
    x = args["input"]
    dim = _norm_dim(args["dim"], _rank(x))
    axes = dict(ctx.axes(x))
    if dim not in axes:
        return Inferred(axes)
    ax = axes[dim]
    old = ctx.atom_old(ax)
    start, end = _slice_bounds(ctx, args, ax)
    if end >= old and start == 0:
        return Inferred(axes)
    if end >= old and 0 < start <= ctx.prefix - ax.offset:
        axes[dim] = Axis(1, ax.offset + start)
        return Inferred(axes)
    if 0 <= start and end <= ctx.prefix - ax.offset:
        del axes[dim]
        return Inferred(axes)
    raise Refusal(f"slices tokens [{start}:{end}] of {old}, which pruning moves")


def resize_slice(ctx, node: fx.Node, args: dict, axes: dict) -> dict:
    """A slice that drops prefix tokens runs to the end of the (shorter) sequence."""
    x = args["input"]
    dim = _norm_dim(args["dim"], _rank(x))
    before, after = ctx.axes(x).get(dim), axes.get(dim)
    if before is not None and after is not None and after != before and args["end"] is not None:
        return {"end": INT_MAX}
    return {}


def reduction(ctx, node: fx.Node, args: dict) -> Inferred:
    """sum, mean, amax, var, norm, …: the token axes of the reduced dims go (pooling over tokens
    is fine), the others stay; no ``dim`` (or ``[]``) reduces every dim."""
    x = args["input"]
    rank = _rank(x)
    dims = {_norm_dim(d, rank) for d in (_dims(args.get("dim")) or range(rank))}
    keepdim = bool(args.get("keepdim", False))
    out = {}
    for d, ax in ctx.axes(x).items():
        if d not in dims:
            out[d if keepdim else d - sum(1 for r in dims if r < d)] = ax
    return Inferred(out)


def _values_only(node: fx.Node) -> bool:
    """max/min along a dim whose indices nobody reads (``x.max(dim=1).values``: max pooling)."""
    return isinstance(val(node), (list, tuple)) and bool(node.users) and all(
        u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users)


def arg_reduction(ctx, node: fx.Node, args: dict) -> Inferred:
    """argmax, argmin, and max/min along a dim: positions along the token axis are refused;
    max/min pooling over tokens (only the values read) reduces like ``amax``."""
    x = args["input"]
    dims = _dims(args["dim"])
    rank = _rank(x)
    axes = ctx.axes(x)
    if dims is None or any(_norm_dim(d, rank) in axes for d in dims):
        if dims is not None and _values_only(node):
            return Inferred([reduction(ctx, node, args).axes, {}])
        raise Refusal("returns positions along the token axis, which pruning renumbers")
    dim = _norm_dim(dims[0], rank)
    keepdim = bool(args["keepdim"])
    out = {d if keepdim else d - (d > dim): ax for d, ax in axes.items()}
    return Inferred([out, out] if isinstance(val(node), (list, tuple)) else out)


def split(ctx, node: fx.Node, args: dict) -> Inferred:
    """split, chunk, unbind along a dim that is not the token axis."""
    x = args["input"]
    dim = _norm_dim(args["dim"], _rank(x))
    axes = ctx.axes(x)
    if dim in axes:
        return _split_tokens(ctx, node, args, dim)
    if node.target is aten.unbind.int:
        part = {d - (d > dim): ax for d, ax in axes.items()}
    else:
        part = dict(axes)
    return Inferred([part] * len(val(node)))


def _split_tokens(ctx, node: fx.Node, args: dict, dim: int) -> Inferred:
    """``split(x, [1, N - 1], dim=tokens)`` (a [CLS] token split off): each piece is the slice it
    stands for, so prefix-only pieces before one last piece that runs to the end are allowed."""
    sizes = args.get("split_sizes")
    if node.target is not aten.split_with_sizes.default or not all(isinstance(n, int) for n in sizes[:-1]):
        raise Refusal("splits the token axis into pieces of a fixed size, which pruning changes "
                      "(only prefix tokens split off in front of the rest can be followed)")
    parts, start = [], 0
    for i, size in enumerate(sizes):
        end = start + size if i < len(sizes) - 1 else INT_MAX
        parts.append(slice_(ctx, node, {"input": args["input"], "dim": dim, "start": start, "end": end, "step": 1}).axes)
        start = end
    return Inferred(parts)


def resize_split(ctx, node: fx.Node, args: dict, axes) -> dict:
    """The last piece of a token-axis split takes what the front pieces leave of the new count."""
    x = args["input"]
    dim = _norm_dim(args["dim"], _rank(x))
    ax = ctx.axes(x).get(dim)
    if ax is None or node.target is not aten.split_with_sizes.default:
        return {}
    front = list(args["split_sizes"][:-1])
    return {"split_sizes": [*front, ctx.atom_new(ax) - sum(front)]}


def stack(ctx, node: fx.Node, args: dict) -> Inferred:
    dim = _norm_dim(args["dim"], _rank(node))
    shifted = [{d + (d >= dim): ax for d, ax in ctx.axes(t).items()} for _, t in operands(args)]
    out = {}
    for s in shifted:
        out.update(s)
    if any(s != out for s in shifted):
        raise Refusal("stacks tensors with different token layouts")
    return Inferred(out)


def cat(ctx, node: fx.Node, args: dict) -> Inferred:
    """Along another dim the pieces broadcast like a pointwise op's operands; along the token
    axis only untouched tokens may go in front of the stream (``_cat_in_front``). An empty 1-D
    piece is skipped, as torch.cat skips it (a transformers DynamicCache's first update:
    ``cat([tensor([]), k], dim=-2)``)."""
    tensors = [(key, t) for key, t in operands(args) if tuple(numeric_shape(t)) != (0,)]
    rank = _rank(node)
    dim = _norm_dim(args["dim"], rank)
    if any(dim in ctx.axes(t) for _, t in tensors):
        return _cat_in_front(ctx, node, tensors, dim)
    return align(ctx, node, tensors, rank)


def _cat_in_front(ctx, node: fx.Node, tensors: list, dim: int) -> Inferred:
    """``cat([front…, x], dim=tokens)``: tokens that pruning does not touch, put in front of the stream.

    Two forms meet here. Rotary ViTs (EVA-02) rotate only the patch tokens ``x[:, P:]`` and
    join the prefix ``x[:, :P]`` back in front; CaiT puts its class token in front of the patch
    tokens after the self-attention blocks. Untracked front pieces of ``f`` tokens before the one
    tracked piece (offset ``o``) give a token axis of offset ``o - f``: its first ``prefix - o + f``
    positions are the same tokens before and after pruning, the rest follow the kept tokens.
    """
    *front, (_, last) = tensors
    ax = ctx.axes(last).get(dim)
    if ax is None or ax.inner != 1 or any(dim in ctx.axes(t) for _, t in front):
        raise Refusal("concatenates along the token axis")
    rank = _rank(node)
    wanted = {d: a for d, a in ctx.axes(last).items() if d != dim}
    gathers = [g for key, t in front for g in meet(ctx, node, key, t, rank, wanted)]
    out = {**wanted, dim: Axis(1, ax.offset - sum(numeric_shape(t)[dim] for _, t in front))}
    return Inferred(out, tuple(gathers))


def getitem(ctx, node: fx.Node, args: dict) -> Inferred:
    parts = ctx.axes_raw(args["input"])
    if isinstance(parts, list):
        return Inferred(parts[args["index"]])
    raise Refusal("indexing a tracked tensor with getitem")


def sym_size(ctx, node: fx.Node, args: dict) -> Inferred:
    if _norm_dim(args["dim"], _rank(args["input"])) in ctx.axes(args["input"]):
        raise Refusal("reads the token count as a number")
    return Inferred(None)


def resize_asserted(ctx, node: fx.Node, args: dict, axes) -> dict:
    """``_assert_tensor_metadata(a, size?, stride?, dtype?)``, which torch.export emits for
    ``.to()``: a size it asserts is rewritten like a reshape's; a stride across the token axis is
    dropped (the new strides follow from the new sizes); the dtype and device checks stay."""
    x = args["a"]
    if not ctx.axes(x):
        return {}
    new = {"stride": None}
    if args["size"] is not None:
        new["size"] = _rewrite_sizes(ctx, args["size"], ctx.axes(x), list(val(x).shape))
    return new


def embedding(ctx, node: fx.Node, args: dict) -> Inferred:
    if ctx.axes(args["weight"]):
        raise Refusal("an embedding table indexed along the token axis")
    return Inferred(dict(ctx.axes(args["indices"])))


def restore(ctx, node: fx.Node, args: dict) -> Inferred:
    """tpc.restore_tokens puts the kept rows back into the full sequence: the result is untracked."""
    base, src = args["base"], args["src"]
    if ctx.axes(base) or set(ctx.axes(src)) - {1} or ctx.axes(src).get(1, Axis()) != Axis():
        raise Refusal("restores tokens of another layout than the compaction's")
    return Inferred(None)


# --------------------------------------------------------------------------- the table

POINTWISE = Rule(pointwise)
SAME = Rule(same_axes)
UNTRACKED = Rule(untracked)
RESHAPE = Rule(reshape)
PERMUTE = Rule(permute)
REDUCTION = Rule(reduction)
ARG_REDUCTION = Rule(arg_reduction)
SPLIT = Rule(split, resize_split)
MATMUL = Rule(matmul)
NORMALIZED = Rule(last_dims(lambda args: len(args["normalized_shape"])))
BATCH_NORM = Rule(batch_norm)

RULES: dict[object, Rule] = {
    **{op: SAME for op in PASS_THROUGH},
    aten.zeros_like.default: SAME, aten.ones_like.default: SAME, aten.empty_like.default: SAME,
    aten.full_like.default: SAME,
    aten.new_zeros.default: UNTRACKED, aten.new_ones.default: UNTRACKED, aten.new_empty.default: UNTRACKED,
    aten.new_full.default: UNTRACKED,
    # elementwise ops torch does not tag pointwise
    aten.hardswish.default: POINTWISE, aten.masked_fill.Tensor: POINTWISE,
    aten.where.ScalarSelf: POINTWISE, aten.where.ScalarOther: POINTWISE, aten.where.Scalar: POINTWISE,
    # ops along the last dims, or per channel
    aten.softmax.int: SAME, aten._softmax.default: SAME,
    aten.log_softmax.int: SAME, aten._log_softmax.default: SAME,
    aten.layer_norm.default: NORMALIZED, aten.rms_norm.default: NORMALIZED,
    aten.linear.default: Rule(last_dims(lambda args: 1)),
    aten.batch_norm.default: BATCH_NORM, aten._native_batch_norm_legit_no_training.default: BATCH_NORM,
    # contractions
    aten.matmul.default: MATMUL, aten.bmm.default: MATMUL, aten.mm.default: MATMUL,
    aten.bmm.dtype: MATMUL, aten.mm.dtype: MATMUL,
    aten.addmm.default: Rule(addmm), aten.addmm.dtype: Rule(addmm),
    aten.scaled_dot_product_attention.default: Rule(sdpa),
    # views and reshapes
    aten.view.default: Rule(reshape, resize_sizes("size")),
    aten._unsafe_view.default: Rule(reshape, resize_sizes("size")),
    aten.reshape.default: Rule(reshape, resize_sizes("shape")),
    aten.unflatten.int: Rule(reshape, resize_unflatten),
    aten.flatten.using_ints: RESHAPE, aten.unsqueeze.default: RESHAPE,
    aten.squeeze.default: RESHAPE, aten.squeeze.dim: RESHAPE, aten.squeeze.dims: RESHAPE,
    aten.reshape_as.default: Rule(reshape_as),
    aten.permute.default: PERMUTE, aten.transpose.int: PERMUTE, aten.t.default: PERMUTE,
    aten.movedim.int: PERMUTE, aten.movedim.intlist: PERMUTE,
    aten.expand.default: Rule(expand, resize_sizes("size")),
    # reads of tokens
    aten.select.int: Rule(select),
    aten.slice.Tensor: Rule(slice_, resize_slice),
    aten.embedding.default: Rule(embedding),
    aten.sym_size.int: Rule(sym_size),
    # reductions
    **{op: REDUCTION for op in (
        aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default,
        aten.amin.default, aten.logsumexp.default, aten.prod.default, aten.prod.dim_int,
        aten.any.default, aten.any.dim, aten.any.dims, aten.all.default, aten.all.dim, aten.all.dims,
        aten.var.default, aten.var.dim, aten.var.correction, aten.std.default, aten.std.dim,
        aten.std.correction, aten.linalg_vector_norm.default, aten.norm.Scalar, aten.norm.ScalarOpt_dim,
        aten.norm.ScalarOpt_dim_dtype, aten.norm.ScalarOpt_dtype, aten.max.default, aten.min.default,
    )},
    aten.max.dim: ARG_REDUCTION, aten.min.dim: ARG_REDUCTION,
    aten.argmax.default: ARG_REDUCTION, aten.argmin.default: ARG_REDUCTION,
    # splits and joins
    aten.unbind.int: SPLIT, aten.split.Tensor: SPLIT, aten.split.sizes: SPLIT, aten.split.default: SPLIT,
    aten.split_with_sizes.default: SPLIT, aten.chunk.default: SPLIT,
    aten.cat.default: Rule(cat), aten.stack.default: Rule(stack),
    operator.getitem: Rule(getitem),
    # checks, with no token-shaped output
    aten._assert_tensor_metadata.default: Rule(untracked, resize_asserted),
    aten._assert_async.default: UNTRACKED, aten._assert_async.msg: UNTRACKED,
    aten._functional_assert_async.msg: UNTRACKED,
    torch.ops.tpc.restore_tokens.default: Rule(restore),
}


def rule_for(node: fx.Node) -> Rule | None:
    """The node's rule: its op's entry, else ``POINTWISE`` for an op torch tags pointwise."""
    rule = RULES.get(node.target)
    if rule is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        return POINTWISE
    return rule
