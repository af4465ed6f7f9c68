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
            summed over the chosen layers (VTC-CLS's ensemble); on a tower without [CLS]
            (SmolVLM) tpc's substitute, the attention each patch receives
            (``tpc::attention_probs`` averaged over heads and queries), averaged over the s²
            patches the pixel shuffle joins into one visual token; [B·images, V/images]
            reshaped to [B, V] (the features' order is the placeholders' order), then
            ``tpc::select_topk``; before the language model only;
   random   ``tpc::random_scores`` over the V visual offsets (the same draw for every
            example, so a batch gives each example what it gets alone), ``tpc::select_topk``.
3. ``kept = tpc::keep_visual(pos, chosen, S)`` [B, S - V + K]: every text token and the
   chosen visual tokens, in order.
4. ``tpc::gather_axis(stream, kept, 1)`` is the new stream, carried through the rest of the
   prefill by the encoders' token-axis rules (``propagate_token_axis``): a tensor made before
   the cut that meets the kept tokens at a token dim (the 4-D attention mask, rows and
   columns; the rotary cos/sin, so kept tokens keep their original positions) is gathered
   there with ``kept``, shape arguments are resized, and an op the rules cannot map is refused
   with the node named. The symbolic prompt length still read after the cut becomes the new
   length; any other size derived from it is refused.
5. The original positions of the kept tokens (composed over stages) become one more graph
   output, so decoding knows which prompt tokens each layer's KV cache holds. The stage's
   ``Compaction`` record (``tpc/record.py``: the new stream, those positions as its index, the
   visual mask it chose among as ``prunable``, each example's visual positions as ``spans``)
   goes on the new stream; a later stage composes its positions from the last record.
Every node is inserted through ``Builder`` with its role; each method's chooser
(``choose_<method>``) is its implementation at ``Where.VISUAL_*`` in ``tpc/registry.py``.

Sketch (stage 2, after layer L)::

    h_L ──────────────────────────────┬─► gather_axis ─► layer L+1 …
    q_L, k_L, mask ─► last_token_attention ─► gather_axis(pos) ─► select_topk ─► keep_visual
    mask [B,1,S,S], cos/sin [B,S,d] ──► (token-axis rules) gather_tokens where they meet the tokens
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph.nodes import describe, module_path, numeric_size, val
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Compaction, Role, attach, compactions, mark_rewritten
from tpc.passes.infra import Pass, PassResult
from tpc.passes.propagate_token_axis import propagate
from tpc.registry import VISUAL, Where, get_method, methods_for
from tpc.vlm import ops  # noqa: F401  (registers the tpc:: VLM ops)
from tpc.vlm.graph import DecoderLayer, decoder_layers, prompt_mask, vision_attention, visual_mask
from tpc.vlm.spec import VisionScoring

logger = logging.getLogger("tpc.passes")
tpc = torch.ops.tpc
aten = torch.ops.aten

@dataclass
class VisualContext:
    """What a method's visual-token chooser reads: it returns ``chosen`` [B, keep], offsets into ``pos``."""

    layers: list[DecoderLayer]
    before: int  # the decoder layer the cut is before (0: before the language model)
    stream: fx.Node  # the residual stream [B, S, C] entering the cut
    pos: fx.Node  # [B, V]: each example's visual positions
    visual: int
    keep: int
    seed: int
    attention_mask: fx.Node  # the prompt's [B, S] attention mask input
    positions: fx.Node | None  # [B, S]: the original positions the stream holds after earlier stages (None: all)
    vision: list[DecoderLayer] | None = None  # the vision layers whose attention scores (needs_cls)
    scoring: VisionScoring | None = None  # how (``Family.cls_scoring``)


class PruneVisual(Pass):
    name = "prune_visual"

    def __init__(self, before_layer: int, method: str, visual: int, keep: int, hidden: int, image_token_id: int,
                 seed: int = 0, scoring: VisionScoring | None = None):
        """``scoring``: for a method that reads the vision tower (topk-cls), which layers and rule."""
        self.where = Where.VISUAL_BEFORE_LM if before_layer == 0 else Where.VISUAL_IN_LM
        self.method = get_method(method)
        if not self.method.applies(*VISUAL):
            raise TpcError(f"unknown visual-token method {method!r}: choose one of {', '.join(methods_for(*VISUAL))}")
        if not 0 <= keep <= visual:
            raise TpcError(f"cannot keep {keep} of {visual} visual tokens")
        self.before, self.visual, self.keep, self.hidden, self.seed = before_layer, visual, keep, hidden, seed
        self.image_token_id = image_token_id
        self.scoring = scoring

    def call(self, gm: fx.GraphModule) -> PassResult:
        layers = decoder_layers(gm)
        if not 0 <= self.before < len(layers):
            raise TpcError(f"cannot prune before decoder layer {self.before}: the language model has {len(layers)} layers")
        choose = self.method.implementation(self.where)
        cut = layers[self.before].first
        before = _nodes_before(gm, cut)
        crossing = [n for n in graph_order(gm, before)
                    if n.op != "get_attr" and any(u not in before and u.op != "output" for u in n.users)]
        stream = self._stream(crossing, cut)
        seq = val(stream).shape[1]
        b = Builder(gm, cut.prev, like=cut)
        length = b.op(aten.sym_size.int, stream, 1, role=Role.GATHER)
        earlier = compactions(gm)  # the stages before this one: their kept positions compose
        positions = earlier[-1].index if earlier else None
        placeholders = visual_mask(gm, self.image_token_id)
        visual = placeholders if positions is None else b.op(
            tpc.gather_axis.default, placeholders, positions, 1, role=Role.GATHER)
        pos = b.op(tpc.visual_index.default, visual, self.visual, role=Role.SELECTION)
        vision = [vision_attention(gm, i) for i in self.scoring.layers] if self.method.needs_cls else None
        ctx = VisualContext(layers, self.before, stream, pos, self.visual, self.keep, self.seed,
                            prompt_mask(gm), positions, vision, self.scoring)
        chosen = choose(b, ctx)
        kept = b.op(tpc.keep_visual.default, pos, chosen, length, role=Role.SELECTION)
        out = b.op(tpc.gather_axis.default, stream, kept, 1, role=Role.GATHER, value=val(stream))  # old terms (rule 6)
        positions = kept if positions is None else b.op(tpc.gather_axis.default, positions, kept, 1,
                                                        role=Role.GATHER)
        new_length = b.op(aten.sym_size.int, kept, 1, role=Role.GATHER)
        inserted = set(b.inserted)
        after = [n for n in gm.graph.nodes if n not in before and n not in inserted]
        for user in list(stream.users):
            if user in after and user.op != "output":
                user.replace_input_with(stream, out)
        record = Compaction(layer=self.before - 1, method=self.method.name, module=module_path(cut),
                            out=out, index=positions, tokens_in=self.visual, tokens_out=self.keep, prefix=0,
                            prunable=visual, spans=pos)
        where = "before the language model" if self.before == 0 else f"after decoder layer {self.before - 1}"
        local = replace(record, index=kept, tokens_in=numeric_size(seq), tokens_out=numeric_size(val(kept).shape[1]))
        propagate(gm, local, place=where)  # the encoders' token-axis rules, gathering with this step's own positions
        self._carry_lengths(crossing, seq, new_length, after, where)
        output = next(iter(gm.graph.find_nodes(op="output")))
        output.args = (tuple(output.args[0]) + (positions,),)  # the kept positions are graph outputs
        attach(record)
        finish(gm, start=b.inserted[0])
        logger.debug("prune_visual: %s keeps %d of %d visual tokens before decoder layer %d",
                     self.method.name, self.keep, self.visual, self.before)
        return PassResult(gm, True)

    @staticmethod
    def _carry_lengths(crossing: list[fx.Node], seq, new_length: fx.Node, after: list[fx.Node], where: str) -> None:
        """The prompt length read after the cut (a size argument the token-axis rules left as it was)
        becomes the new length; a size derived from it cannot be rewritten and is refused."""
        later = set(after)
        for node in crossing:
            value = val(node)
            if not isinstance(value, torch.SymInt) or not any(user in later for user in node.users):
                continue
            if not _same(value, seq) and _mentions(value, seq):
                raise TpcError(f"cannot prune {where}: {describe(node)} is a size derived from the prompt length and is "
                               "read after the pruning point: tpc cannot rewrite it")
            if _same(value, seq):
                for user in list(node.users):
                    if user in later and user.op != "output":
                        user.replace_input_with(node, new_length)
                        mark_rewritten(user)

    def _stream(self, crossing: list[fx.Node], cut: fx.Node) -> fx.Node:
        found = [n for n in crossing if isinstance(val(n), torch.Tensor) and val(n).dim() == 3
                 and val(n).is_floating_point() and val(n).shape[-1] == self.hidden]
        if len(found) != 1:
            raise TpcError(f"expected one residual stream [B, S, {self.hidden}] entering {describe(cut)}, found "
                           f"{[n.name for n in found]}")
        return found[0]


def choose_topk_cls(b: Builder, ctx: VisualContext) -> fx.Node:
    """VTC-CLS (Wang et al., 2024, arXiv 2412.05819): the vision encoder's [CLS] attention over its
    patches, s_j = Σ_l mean_h A^l_h[CLS, j] over the chosen layers l (the official code's sum over
    ``attentions[start_layer:-1]``), [B·images, P] -> [B, V]; top K per example. A tower without
    [CLS]: s_j = Σ_l mean_{h,i} A^l_h[i, j], the attention patch j receives (PoWER-BERT's
    significance, Goyal et al., ICML 2020), tpc's substitute."""
    scoring = ctx.scoring
    scores = None
    for vision in ctx.vision:
        if scoring.rule == "cls":
            layer = b.op(tpc.cls_attention.default, vision.q, vision.k, vision.scale, vision.mask, role=Role.SCORING)
        else:
            probs = b.op(tpc.attention_probs.default, vision.q, vision.k, vision.scale, vision.mask,
                         role=Role.SCORING)
            layer = b.op(aten.mean.dim, probs, [1, 2], role=Role.SCORING)  # [B·images, P]: heads and queries
        scores = layer if scores is None else b.op(aten.add.Tensor, scores, layer, role=Role.SCORING)
    if scoring.drop:
        scores = b.op(aten.slice.Tensor, scores, 1, scoring.drop, role=Role.SCORING)
    if scoring.shuffle > 1:
        scores = _shuffled(b, scores, scoring.shuffle)
    batch = b.op(aten.sym_size.int, ctx.pos, 0, role=Role.GATHER)
    per_example = b.op(aten.reshape.default, scores, [batch, ctx.visual], role=Role.SCORING)
    return b.op(tpc.select_topk.default, per_example, ctx.keep, 0, role=Role.SELECTION)


def _shuffled(b: Builder, scores: fx.Node, s: int) -> fx.Node:
    """[N, P] patch scores -> [N, P/s²]: the mean over the s² patches that the connector's pixel shuffle
    (Idefics3 / SmolVLM ``pixel_shuffle``, the same views and permutes on one channel) makes one token."""
    patches = numeric_size(val(scores).shape[1])
    side = int(round(patches ** 0.5))
    if side * side != patches or side % s:
        raise TpcError(f"a vision tower of {patches} patches is not a square grid the pixel shuffle {s} divides: "
                       "topk-cls cannot map its patch scores to visual tokens")
    x = b.op(aten.reshape.default, scores, [-1, side, side // s, s], role=Role.SCORING)
    x = b.op(aten.permute.default, x, [0, 2, 1, 3], role=Role.SCORING)
    x = b.op(aten.reshape.default, x, [-1, side // s, side // s, s * s], role=Role.SCORING)
    x = b.op(aten.permute.default, x, [0, 2, 1, 3], role=Role.SCORING)
    x = b.op(aten.reshape.default, x, [-1, patches // (s * s), s * s], role=Role.SCORING)
    return b.op(aten.mean.dim, x, [-1], role=Role.SCORING)


def choose_fastv(b: Builder, ctx: VisualContext) -> fx.Node:
    """FastV: the last prompt token's attention at the decoder layer before the cut."""
    layer = ctx.layers[ctx.before - 1]
    valid = ctx.attention_mask if ctx.positions is None else b.op(
        tpc.gather_axis.default, ctx.attention_mask, ctx.positions, 1, role=Role.GATHER)
    scores = b.op(tpc.last_token_attention.default, layer.q, layer.k, layer.scale, layer.mask, valid,
                  role=Role.SCORING)
    visual_scores = b.op(tpc.gather_axis.default, scores, ctx.pos, 1, role=Role.GATHER)
    return b.op(tpc.select_topk.default, visual_scores, ctx.keep, 0, role=Role.SELECTION)


def _diverse(op, b: Builder, ctx: VisualContext) -> fx.Node:
    features = b.op(tpc.gather_axis.default, ctx.stream, ctx.pos, 1, role=Role.GATHER)
    return b.op(op, features, ctx.keep, 0, role=Role.SELECTION)


def choose_divprune(b: Builder, ctx: VisualContext) -> fx.Node:
    return _diverse(tpc.divprune.default, b, ctx)


def choose_kcenter(b: Builder, ctx: VisualContext) -> fx.Node:
    return _diverse(tpc.kcenter.default, b, ctx)


def choose_random(b: Builder, ctx: VisualContext) -> fx.Node:
    """The same draw over the V offsets for every example (a batch gives each what it gets alone)."""
    one = b.op(aten.slice.Tensor, ctx.pos, 0, 0, 1, role=Role.SCORING)
    scores = b.op(tpc.random_scores.default, one, ctx.seed, role=Role.SCORING)
    picks = b.op(tpc.select_topk.default, scores, ctx.keep, 0, role=Role.SELECTION)
    batch = b.op(aten.sym_size.int, ctx.pos, 0, role=Role.GATHER)
    return b.op(aten.expand.default, picks, [batch, ctx.keep], role=Role.SELECTION)


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


def _same(size, seq) -> bool:
    if isinstance(size, int) or isinstance(seq, int):
        return isinstance(size, int) and isinstance(seq, int) and size == seq
    return size.node.expr == seq.node.expr


def _mentions(size, seq) -> bool:
    if isinstance(seq, int) or isinstance(size, int):
        return False
    return bool(size.node.expr.free_symbols & seq.node.expr.free_symbols)
