"""``proportional_attention``: ToMe's size-aware attention after a merge (ToMe, Eq. 1).

A merged token stands for several tokens, so every later attention adds log(size) of each
key to its logits:

    softmax(q kᵀ · s + mask)        ==>      softmax(q kᵀ · s + mask + log(size)[:, None, None, :])

1. for each attention site, the latest merge feeding its queries gives the sizes;
2. explicit attention: the bias is added to the softmax input; SDPA is written out as
   softmax(q kᵀ · s + mask + bias) · v (the ONNX export decomposes SDPA the same way, and
   SDPA with a float mask picks kernels whose output strides torch's decompositions trip on);
3. the bias takes the logits' dtype when the graph runs (fp16/bf16 models, or a module cast after
   compiling), so a half-precision attention stays half precision;
4. sites with no merge upstream are untouched; no merge in the graph: ``modified=False``.
"""

from __future__ import annotations

from torch import fx

from tpc.errors import TpcError
from tpc.graph import find_attention_sites
from tpc.graph.nodes import ancestors, aten, val
from tpc.passes.cleanup import finish
from tpc.passes.infra import Pass, PassResult
from tpc.passes.compaction import Builder, Role, compactions
from tpc.passes.prune_methods import stream_sizes


class ProportionalAttention(Pass):
    name = "proportional_attention"
    runs_after = ("InsertPrune",)  # reads every compaction's merge sizes

    def call(self, gm: fx.GraphModule) -> PassResult:
        records = compactions(gm)
        if not any(c.merge is not None for c in records):
            return PassResult(gm, False)
        changed = False
        biases: dict[fx.Node, fx.Node] = {}
        for site in find_attention_sites(gm):
            upstream = ancestors(site.q)
            feeding = [c for c in records if c.out in upstream]
            sizes = stream_sizes(gm, feeding[-1]) if feeding else None  # a merge's, or carried on by a later gather
            if sizes is None:
                continue
            if len(val(site.q).shape) != 4:
                raise TpcError(f"tome: proportional attention needs [B, H, N, d] queries at layer {site.layer} ({site.module})")
            merge = sizes
            if merge not in biases:
                b = Builder(gm, sizes)
                log = b.op(aten.log.default, sizes, role=Role.MODEL)
                biases[merge] = b.op(aten.view.default, log, [-1, 1, 1, val(sizes).shape[-1]], role=Role.MODEL)
            bias = biases[merge]
            b = Builder(gm, _last_input(site.node))
            b.like = site.node
            if site.kind == "sdpa":
                if site.is_causal or site.node.kwargs.get("enable_gqa"):
                    raise TpcError(f"tome: proportional attention does not support causal or grouped-query attention "
                                   f"(layer {site.layer}, {site.module})")
                kt = b.op(aten.transpose.int, site.k, -2, -1, role=Role.MODEL)
                logits = b.op(aten.mul.Tensor, b.op(aten.matmul.default, site.q, kt, role=Role.MODEL), site.scale,
                              role=Role.MODEL)
                if site.mask is not None and val(site.mask).dtype.is_floating_point:
                    logits = b.op(aten.add.Tensor, logits, site.mask, role=Role.MODEL)
                elif site.mask is not None:
                    neg = b.op(aten.full_like.default, logits, float("-inf"), role=Role.MODEL)
                    logits = b.op(aten.where.self, site.mask, logits, neg, role=Role.MODEL)
                probs = b.op(aten.softmax.int, b.op(aten.add.Tensor, logits, _like(b, bias, logits), role=Role.MODEL), -1,
                             role=Role.MODEL)
                out = b.op(aten.matmul.default, probs, site.v, role=Role.MODEL)
                site.node.replace_all_uses_with(out)
            else:
                logits = b.op(aten.add.Tensor, site.node.args[0], _like(b, bias, site.node.args[0]), role=Role.MODEL)
                site.node.args = (logits, *site.node.args[1:])
            changed = True
        if changed:
            finish(gm)
        return PassResult(gm, changed)


def _like(b: Builder, bias: fx.Node, logits: fx.Node) -> fx.Node:
    """The (float32) bias in the logits' dtype, read when the graph runs: a module compiled in fp32
    and cast with ``.to(torch.bfloat16)`` adds a bf16 bias, and the softmax stays in the model's dtype."""
    return b.op(aten.type_as.default, bias, logits, role=Role.MODEL)


def _last_input(node: fx.Node) -> fx.Node:
    """The input of ``node`` defined last in the graph: new nodes placed after it precede ``node``."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return max(node.all_input_nodes, key=order.__getitem__)
