"""Read-only analysis of a captured decode step: each decoder layer's attention over the cache.

In the stock models a layer's attention reads ``cat([past, new], -2)`` for keys and values
(the cache's update), possibly repeated over query heads (``repeat_kv``: unsqueeze, expand,
reshape), and the model's SDPA mask [B, 1, 1, L + 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.decode import ops  # noqa: F401  (registers the tpc:: decode ops a written step holds)
from tpc.graph.layers import layer_path
from tpc.graph.nodes import is_op, val
from tpc.registry import Where, methods_for

aten = torch.ops.aten
REPEAT = (aten.unsqueeze, aten.expand, aten.reshape, aten.view, aten.clone, aten.contiguous)


@dataclass(frozen=True)
class CacheAttention:
    layer: int
    sdpa: fx.Node
    past_k: fx.Node  # placeholder [B, Hkv, L, d]
    past_v: fx.Node
    new_k: fx.Node  # the new token's keys (rotary applied) [B, Hkv, 1, d]
    new_v: fx.Node
    keys: fx.Node  # cat([past_k, new_k]) [B, Hkv, L + 1, d]
    values: fx.Node  # cat([past_v, new_v])
    mask: fx.Node  # [B, 1, 1, L + 1]

    @property
    def q(self) -> fx.Node:
        return self.sdpa.args[0]

    @property
    def scale(self) -> float:
        scale = self.sdpa.kwargs.get("scale")
        return float(scale) if scale is not None else float(val(self.q).shape[-1]) ** -0.5


def _cache_cat(node: fx.Node, sdpa: fx.Node) -> fx.Node:
    while is_op(node, *REPEAT):
        node = node.args[0]
    if not is_op(node, aten.cat) or len(node.args[0]) != 2 or node.args[0][0].op != "placeholder":
        raise TpcError(f"the attention {sdpa.name} does not read the KV cache as cat([past, new]) (found "
                       f"{getattr(node, 'name', node)}): tpc rewrites stock transformers attention with a DynamicCache")
    return node


def cache_attention(gm: fx.GraphModule) -> list[CacheAttention]:
    """Every decoder layer's attention over the cache, by layer index."""
    found: dict[int, CacheAttention] = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        path = layer_path(node)
        layer = path[1] if path else None
        if layer is None or layer in found:
            raise TpcError(f"attention {node.name} is not the one self-attention of a decoder layer "
                           f"(model.layers.<i>): tpc expects stock decoder layers")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is None:
            raise TpcError(f"decoder layer {layer}'s attention has no mask in the captured decode step")
        keys, values = _cache_cat(node.args[1], node), _cache_cat(node.args[2], node)
        found[layer] = CacheAttention(layer, node, keys.args[0][0], values.args[0][0], keys.args[0][1],
                                      values.args[0][1], keys, values, mask)
    if not found:
        raise TpcError("the captured decode step has no scaled_dot_product_attention: load the model with "
                       "attn_implementation='sdpa'")
    return [found[i] for i in sorted(found)]


def step_symbols(gm: fx.GraphModule) -> dict[str, str]:
    """Printable names of the decode step's symbols: B (batch), L (cached positions)."""
    past = [n for n in gm.graph.nodes if n.op == "placeholder"][3]
    shape = val(past).shape
    return {str(shape[0].node.expr): "B", str(shape[2].node.expr): "L"}


def refuse_decode_step(module, name: str) -> None:
    """A decode step tpc wrote (a .pt2 of a decode-time method: ``--pass tidal``, ``quest`` or ``dhsa``) takes a KV
    cache, not a prompt: it is run by its own caller, and inspected or compiled from the model it came from."""
    graph = getattr(module, "graph", None)
    decode_ops = (torch.ops.tpc.top_positions.default, torch.ops.tpc.gather_positions.default)
    if isinstance(graph, fx.Graph) and any(n.target in decode_ops for n in graph.nodes):
        methods = " or ".join(methods_for(Where.DECODE))
        raise TpcError(f"{name} is a decode step tpc wrote (decode-time sparse attention): it takes a KV cache, not a "
                       f"prompt; inspect or compile the model it came from (with --pass {methods} --layers … --keep …)")
