"""``insert_prune``: a score-and-compact pair after one layer's attention, carried through the graph.

Rewrite (for the stream tensor ``x`` of layer L, [B, N, C]):

    x = add(skip, attn_out)                     x = add(skip, attn_out)
    y = layer_norm(x) …            ==>          s = <method scorer>(q_L, k_L | x)     [B, N]
    z = add(x, mlp(y))                          i = tpc.select_topk(s, k, P)          [B, P+k]
                                                x' = tpc.gather_tokens(x, i)          [B, P+k, C]
                                                y = layer_norm(x') …
                                                z = add(x', mlp(y))

1. every use of ``x`` (except by the new nodes) reads ``x'`` — a gather, or a merge for ToMe
   and EViT's fused token (see ``prune_methods.py``);
2. a [N, B, C] stream is permuted to [B, N, C] around the compaction;
3. with ``restore``, the full sequence comes back after the last block: the kept tokens, as
   the later layers left them, are written over the stream as it was at this layer
   (``tpc.restore_tokens``), so dropped tokens reach the output unchanged and heads that need
   every position (dense features, segmentation) still get them;
4. an ``r`` (tokens removed) is clamped to the method's bound at this layer (tome: ToMe's
   ``(tokens - prefix) // 2``), kept in ``self.removal`` for the report; r = 0 inserts nothing
   (``modified=False``), as ToMe's r = 0 leaves the layer alone;
5. when the sequence length is symbolic (a text model captured with a dynamic length), the
   count kept is computed in the graph from the incoming length ``n`` (``sym_size``): a ratio
   keeps ``ceil(ratio × (n - P))``, a count ``min(count, n - P)`` (clamped), so one graph
   serves every length;
6. the compaction's record (:class:`tpc.passes.compaction.Compaction`) is attached to ``x'``,
   and the smaller token count is carried through every later node
   (:func:`tpc.passes.propagate_token_axis.propagate`) before the pass ends with ``finish()``:
   the graph this pass leaves is executable, as after every pass.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph import find_attention_sites, find_stream_point
from tpc.graph.attention import layer_runs
from tpc.graph.nodes import aten, to_front, val
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Compaction, Role, attach, compactions
from tpc.passes.infra import Pass, PassResult
from tpc.passes.propagate_token_axis import propagate
from tpc.passes.prune_methods import PruneContext, stream_sizes
from tpc.registry import Where, get_method
from tpc.schedule import KeepValue, Removal, kept_count, ratio_fraction

logger = logging.getLogger("tpc.passes")
FEW_KEPT = 0.05  # an integer keep below this share of the tokens is said: likely a ratio typed without its point


def _self_attention_layers(sites) -> str:
    layers = [s.layer for s in sites if s.self_attention]
    return f"this model's self-attention layers are {layer_runs(layers)}" if layers else "this model has none"


class InsertPrune(Pass):
    def __init__(self, method: str, layer: int, keep: KeepValue, prefix: int, after: str = "attention",
                 seed: int = 0, options: dict | None = None, restore: bool = False):
        self.method = get_method(method, Where.ENCODER)
        self.options = self.method.resolve_options(options)
        self.layer = layer
        self.keep = keep
        self.prefix = prefix
        self.after = after
        self.seed = seed
        self.restore = restore
        self.removal: tuple[int, int] | None = None  # (r asked, r applied) once the pass ran with an r
        if restore and self.options.get("fuse"):
            raise TpcError("restore and fuse do not go together: the fused token has no place in the full sequence")
        self.name = f"insert_prune(layer {layer})"

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = find_attention_sites(gm)
        if self.layer >= len(sites):
            raise TpcError(f"layer {self.layer} is out of range: the model has {len(sites)} attention layers (0-{len(sites) - 1})")
        site = sites[self.layer]
        if not site.self_attention:
            queries = f"{site.tokens} quer{'y' if site.tokens == 1 else 'ies'}"
            raise TpcError(f"layer {self.layer} ({site.module}) is class- or cross-attention ({queries} over "
                           f"{site.key_tokens} keys): tpc prunes self-attention layers; {_self_attention_layers(sites)}")
        point = find_stream_point(gm, site, self.after)
        tokens = point.tokens
        symbolic = not isinstance(val(point.node).shape[point.token_dim], int)
        if tokens <= self.prefix:
            raise TpcError(f"layer {self.layer} sees {tokens} tokens, all of them prefix tokens: nothing to prune")
        if symbolic and isinstance(self.keep, Removal):
            raise TpcError(f"--r removes a fixed number of tokens, but layer {self.layer} sees a dynamic sequence length: "
                           "give --keep as a ratio, or fix the length with --seq-len N")
        keep = self._bounded(self.keep, tokens)
        if keep == 0 and isinstance(keep, Removal):
            logger.debug("%s: r = 0, nothing to remove", self.name)
            return PassResult(gm, False)  # ToMe's r = 0: the layer is left as it is
        kept = None if symbolic else kept_count(keep, tokens, self.prefix, self.layer)
        if type(keep) is int and kept is not None and kept < FEW_KEPT * (tokens - self.prefix):  # --keep 1 meant as 1.0?
            logger.warning("layer %d keeps %d of its %d tokens (not counting prefix tokens), under %d%%: an integer "
                           "keep counts tokens, a ratio is written with a point (keep 1.0 keeps every token)",
                           self.layer, kept, tokens - self.prefix, 100 * FEW_KEPT)

        b = Builder(gm, point.node)
        rank = len(val(point.node).shape)
        to_canonical = None
        stream = point.node
        if (point.batch_dim, point.token_dim) != (0, 1):
            if point.batch_dim is None:
                raise TpcError(f"layer {self.layer}: the stream at {point.node.name} has no visible batch dimension")
            to_canonical, from_canonical = to_front(rank, point.batch_dim, point.token_dim)
            stream = b.op(aten.permute.default, point.node, to_canonical, role=Role.GATHER)
        if symbolic:
            kept = self._kept_in_graph(b, stream)

        earlier = compactions(gm)
        sized = earlier[-1] if earlier and (earlier[-1].merge is not None or earlier[-1].carries is not None) else None
        if sized is not None and self.options.get("fuse"):
            raise TpcError(f"layer {self.layer}: topk-cls with fuse=True cannot follow a tome merge (the fused token's "
                           "size is not tracked); drop fuse, or merge after this layer instead")
        ctx = PruneContext(site=site, point=point, stream=stream, tokens=tokens, kept=kept, prefix=self.prefix,
                           layer=self.layer, depth=len(sites), seed=self.seed, options=self.options,
                           sizes=stream_sizes(gm, sized) if sized is not None else None)
        result = self.method.implementation(Where.ENCODER)(b, ctx)
        out = result.out
        if to_canonical is not None:
            out = b.op(aten.permute.default, result.out, from_canonical, role=Role.GATHER)

        new_nodes = set(b.inserted)
        if self.restore:
            new_nodes |= self._insert_restore(gm, sites[-1], point, result)
        point.node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in new_nodes)
        record = Compaction(layer=self.layer, method=self.method.name, module=site.module, out=result.out,
                            index=result.index, tokens_in=tokens, tokens_out=result.tokens, prefix=self.prefix,
                            merge=result.merge, carries=sized if result.merge is None else None)
        attach(record)
        gm.graph.lint()
        propagate(gm, record)
        finish(gm)
        return PassResult(gm, True)

    def _kept_in_graph(self, b: Builder, stream: fx.Node) -> fx.Node:
        """The non-prefix count kept, computed from the stream's symbolic length (see rule 5)."""
        n = b.op(aten.sym_size.int, stream, 1, role=Role.SELECTION)
        available = b.op(operator.sub, n, self.prefix, role=Role.SELECTION) if self.prefix else n
        if isinstance(self.keep, int):
            return b.op(torch.sym_min, available, self.keep, role=Role.SELECTION)
        f = ratio_fraction(self.keep)
        scaled = b.op(operator.add, b.op(operator.mul, available, f.numerator, role=Role.SELECTION), f.denominator - 1, role=Role.SELECTION)
        return b.op(operator.floordiv, scaled, f.denominator, role=Role.SELECTION)

    def _bounded(self, keep: KeepValue, tokens: int) -> KeepValue:
        """An r clamped to the method's bound at this layer (tome: ToMe's (tokens - prefix) // 2)."""
        if not isinstance(keep, Removal):
            return keep
        limit = self.method.max_removal(tokens, self.prefix) if self.method.max_removal else int(keep)
        applied = min(int(keep), limit)
        self.removal = (int(keep), applied)
        if applied < keep:
            logger.debug("%s: r = %d clamped to %d (%d tokens, %d prefix)", self.name, keep, applied, tokens, self.prefix)
        return Removal(applied)

    def _insert_restore(self, gm: fx.GraphModule, last_site, point, result) -> set[fx.Node]:
        if (point.batch_dim, point.token_dim) != (0, 1):
            raise TpcError(f"restore needs a [B, N, C] stream; layer {self.layer}'s is laid out otherwise")
        end = find_stream_point(gm, last_site, "block").node
        if end is point.node:
            return set()
        b = Builder(gm, end)
        restored = b.op(torch.ops.tpc.restore_tokens.default, point.node, result.index, end, role=Role.GATHER, value=val(end))
        end.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
        return {restored}
