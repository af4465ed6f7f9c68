"""``prune_visual``: keep K of the V visual tokens of every example before decoder layer j.

Rewrite rules (cut = the first node of decoder layer j; j = 0 prunes before the language
model, stage 1; j = L + 1 prunes after decoder layer L, stage 2):

1. ``pos = tpc::visual_index(visual_mask, V)``: each example's visual positions [B, V].
2. The method picks ``chosen`` [B, K] among them:
   fastv    ``tpc::last_token_attention(q_L, k_L, mask_L, attention_mask)`` (layer L's own q
            and k, as SDPA returns no weights; the query is each example's last real prompt
            token, so right padding is never the query) gathered at ``pos``, then
            ``tpc::select_topk``;
   divprune / kcenter  ``tpc::divprune`` / ``tpc::kcenter`` on the residual stream at ``pos``;
   topk-cls VTC-CLS: ``tpc::cls_attention`` (head-mean attention of the vision tower's
            [CLS] query at a vision layer, from that layer's own q and k) over the patches,
            [B·images, P] reshaped to [B, V] (the features' order is the placeholders'
            order), then ``tpc::select_topk``; before the language model only;
   random   ``tpc::random_scores`` over the V visual offsets (the same draw for every
            example, so a batch gives each example what it gets alone), ``tpc::select_topk``.
3. ``kept = tpc::keep_visual(pos, chosen, S)`` [B, S - V + K]: every text token and the
   chosen visual tokens, in order.
4. Every tensor made before the cut and read after it is gathered along each of its token
   axes with ``tpc::gather_axis``: the residual stream, the 4-D attention mask (rows and
   columns), the rotary cos/sin (so kept tokens keep their original positions), the visual
   mask (for a later stage). The symbolic sequence length read after the cut becomes the
   stream's new length; any other size derived from it is refused.
5. The original positions of the kept tokens (composed over stages) become one more graph
   output, so decoding knows which prompt tokens each layer's KV cache holds; a later stage
   reads the visual mask at those positions.

Sketch (stage 2, after layer L)::

    h_L ──────────────────────────────┬─► gather_axis ─► layer L+1 …
    q_L, k_L, mask ─► last_token_attention ─► gather_axis(pos) ─► select_topk ─► keep_visual
    mask [B,1,S,S], cos/sin [B,S,d] ─────────────────────► gather_axis ─► layer L+1 …
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph.nodes import describe, val
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Role, mark_rewritten, set_role
from tpc.passes.infra import Pass, PassResult
from tpc.vlm import ops  # noqa: F401  (registers the tpc:: VLM ops)
from tpc.vlm.graph import decoder_layers, vision_attention

logger = logging.getLogger("tpc.passes")
tpc = torch.ops.tpc
aten = torch.ops.aten

METHODS = ("fastv", "divprune", "kcenter", "random", "topk-cls")
# What each inserted op is for (FLOPs and reports count by role); the rest (gathers, sizes) move tokens.
_ROLES = {tpc.last_token_attention.default: Role.SCORING, tpc.random_scores.default: Role.SCORING,
          tpc.cls_attention.default: Role.SCORING, aten.reshape.default: Role.SCORING,
          aten.slice.Tensor: Role.SCORING, tpc.visual_index.default: Role.SELECTION,
          tpc.select_topk.default: Role.SELECTION, tpc.divprune.default: Role.SELECTION,
          tpc.kcenter.default: Role.SELECTION, tpc.keep_visual.default: Role.SELECTION,
          aten.expand.default: Role.SELECTION}
STATE = "tpc_vlm"  # gm.meta key: {"visual": the placeholder mask, "attention_mask": the prompt's [B, S] mask input,
#                   "positions": last kept positions, "stages", "inserted"}


class PruneVisual(Pass):
    name = "prune_visual"

    def __init__(self, before_layer: int, method: str, visual: int, keep: int, hidden: int, seed: int = 0,
                 cls: tuple[int, int] | None = None):
        """``cls``: for topk-cls, (the vision layer whose [CLS] attention scores, leading tokens
        the features drop: 1 when the [CLS] itself is not a visual token)."""
        if method not in METHODS:
            raise TpcError(f"unknown visual-token method {method!r}: choose one of {', '.join(METHODS)}")
        if not 0 <= keep <= visual:
            raise TpcError(f"cannot keep {keep} of {visual} visual tokens")
        self.before, self.method, self.visual, self.keep, self.hidden, self.seed = before_layer, method, visual, keep, hidden, seed
        self.cls = cls

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        layers = decoder_layers(gm)
        if not 0 <= self.before < len(layers):
            raise TpcError(f"cannot prune before decoder layer {self.before}: the language model has {len(layers)} layers")
        cut = layers[self.before].first
        before = _nodes_before(gm, cut)
        crossing = [n for n in graph_order(gm, before)
                    if n.op != "get_attr" and any(u not in before and u.op != "output" for u in n.users)]
        stream = self._stream(crossing, cut)
        seq = val(stream).shape[1]
        graph = gm.graph
        with graph.inserting_before(cut):
            length = graph.call_function(aten.sym_size.int, (stream, 1))
            visual = state["visual"] if state["positions"] is None else graph.call_function(
                tpc.gather_axis.default, (state["visual"], state["positions"], 1))
            pos = graph.call_function(tpc.visual_index.default, (visual, self.visual))
            vision = vision_attention(gm, self.cls[0]) if self.method == "topk-cls" else None
            chosen = self._choose(graph, layers, stream, pos, state, vision)
            kept = graph.call_function(tpc.keep_visual.default, (pos, chosen, length))
            gathered = {}
            for node in crossing:
                value = val(node)
                if isinstance(value, torch.SymInt):
                    if _same(value, seq):
                        gathered[node] = None  # replaced by the new length below
                    elif _mentions(value, seq):
                        raise TpcError(f"{describe(node)} is a size derived from the sequence length and is read after "
                                       "the pruning point: tpc cannot rewrite it")
                    continue
                if not isinstance(value, torch.Tensor):
                    continue
                axes = [d for d, size in enumerate(value.shape) if _same(size, seq)]
                if not axes:
                    continue
                if axes[0] == 0:
                    raise TpcError(f"{describe(node)} has the token axis first (no batch axis) and is read after the "
                                   "pruning point: tpc cannot gather it")
                out = node
                for axis in axes:
                    out = graph.call_function(tpc.gather_axis.default, (out, kept, axis))
                gathered[node] = out
            positions = kept if state["positions"] is None else graph.call_function(
                tpc.gather_axis.default, (state["positions"], kept, 1))
            new_stream = gathered[stream]
            new_length = graph.call_function(aten.sym_size.int, (new_stream, 1))
        inserted = set(graph.nodes) - before - _after_nodes(gm, cut)
        for node, out in gathered.items():
            replacement = new_length if out is None else out
            for user in list(node.users):
                if user not in before and user not in inserted and user.op != "output":
                    user.replace_input_with(node, replacement)
                    mark_rewritten(user)
        output = next(iter(graph.find_nodes(op="output")))
        output.args = (tuple(output.args[0]) + (positions,),)  # the kept positions are graph outputs
        state["positions"] = positions
        state["stages"].append({"before_layer": self.before, "method": self.method, "visual_in": self.visual,
                                "visual_out": self.keep, "kept": positions})
        for node in inserted:
            set_role(node, _ROLES.get(node.target, Role.GATHER))
            node.meta["nn_module_stack"] = dict(cut.meta.get("nn_module_stack") or {})
        state["inserted"] |= inserted
        finish(gm, start=next(n for n in graph.nodes if n in inserted))
        logger.debug("prune_visual: %s keeps %d of %d visual tokens before decoder layer %d",
                     self.method, self.keep, self.visual, self.before)
        return PassResult(gm, True)

    def _stream(self, crossing: list[fx.Node], cut: fx.Node) -> fx.Node:
        found = [n for n in crossing if isinstance(val(n), torch.Tensor) and val(n).dim() == 3
                 and val(n).is_floating_point() and val(n).shape[-1] == self.hidden]
        if len(found) != 1:
            raise TpcError(f"expected one residual stream [B, S, {self.hidden}] entering {describe(cut)}, found "
                           f"{[n.name for n in found]}")
        return found[0]

    def _choose(self, graph: fx.Graph, layers, stream: fx.Node, pos: fx.Node, state: dict, vision) -> fx.Node:
        call = graph.call_function
        if self.method == "topk-cls":  # VTC-CLS: the vision encoder's [CLS] attention over its patches
            scores = call(tpc.cls_attention.default, (vision.q, vision.k, vision.scale, vision.mask))
            if self.cls[1]:
                scores = call(aten.slice.Tensor, (scores, 1, self.cls[1]))
            per_example = call(aten.reshape.default, (scores, [call(aten.sym_size.int, (pos, 0)), self.visual]))
            return call(tpc.select_topk.default, (per_example, self.keep, 0))
        if self.method == "fastv":
            if self.before == 0:
                raise TpcError("fastv scores tokens with a decoder layer's attention: give the layer(s) to prune "
                               "after (--layers), or prune before the language model with divprune, kcenter or random")
            layer = layers[self.before - 1]
            valid = state["attention_mask"] if state["positions"] is None else call(
                tpc.gather_axis.default, (state["attention_mask"], state["positions"], 1))
            scores = call(tpc.last_token_attention.default, (layer.q, layer.k, layer.scale, layer.mask, valid))
            visual_scores = call(tpc.gather_axis.default, (scores, pos, 1))
            return call(tpc.select_topk.default, (visual_scores, self.keep, 0))
        if self.method in ("divprune", "kcenter"):
            features = call(tpc.gather_axis.default, (stream, pos, 1))
            op = tpc.divprune.default if self.method == "divprune" else tpc.kcenter.default
            return call(op, (features, self.keep, 0))
        one = call(aten.slice.Tensor, (pos, 0, 0, 1))
        scores = call(tpc.random_scores.default, (one, self.seed))
        picks = call(tpc.select_topk.default, (scores, self.keep, 0))
        return call(aten.expand.default, (picks, [call(aten.sym_size.int, (pos, 0)), self.keep]))


def _nodes_before(gm: fx.GraphModule, cut: fx.Node) -> set[fx.Node]:
    out = set()
    for node in gm.graph.nodes:
        if node is cut:
            return out
        out.add(node)
    return out


def graph_order(gm: fx.GraphModule, nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in graph order (a set's order would change the rewrite's node order run to run)."""
    return [n for n in gm.graph.nodes if n in nodes]


def _after_nodes(gm: fx.GraphModule, cut: fx.Node) -> set[fx.Node]:
    out, seen = set(), False
    for node in gm.graph.nodes:
        seen = seen or node is cut
        if seen:
            out.add(node)
    return out


def _same(size, seq) -> bool:
    if isinstance(size, int) or isinstance(seq, int):
        return isinstance(size, int) and isinstance(seq, int) and size == seq
    return size.node.expr == seq.node.expr


def _mentions(size, seq) -> bool:
    if isinstance(seq, int):
        return False
    return bool(size.node.expr.free_symbols & seq.node.expr.free_symbols)
