"""Read-only analysis of a captured VLM prefill: the visual tokens and the decoder layers.

The visual tokens are found from the graph itself: the boolean mask ``input_ids ==
image_token_id`` that feeds ``masked_scatter`` of the image features into the prompt's
embeddings. It is a [B, S] tensor, so every example has its own visual span (prompts of
different lengths, left padding). The layers come from the analysis encoders use
(:func:`tpc.graph.layers.find_layers`: each attention site and the numbered layer it sits in):
the language model's decoder layers are the last stack in graph order (the prefill ends with
it), the vision tower's the stack before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph.layers import Layer, find_layers, stacks
from tpc.graph.nodes import is_op, val

aten = torch.ops.aten


@dataclass(frozen=True)
class DecoderLayer:
    index: int
    first: fx.Node  # the layer's first node in graph order
    attention: fx.Node  # its scaled_dot_product_attention call

    @property
    def q(self) -> fx.Node:
        return self.attention.args[0]

    @property
    def k(self) -> fx.Node:
        return self.attention.args[1]

    @property
    def mask(self) -> fx.Node | None:
        args = self.attention.args
        return args[3] if len(args) > 3 else self.attention.kwargs.get("attn_mask")

    @property
    def scale(self) -> float:
        scale = self.attention.kwargs.get("scale")
        return float(scale) if scale is not None else float(val(self.q).shape[-1]) ** -0.5


def _sdpa(layer: Layer, what: str) -> DecoderLayer:
    if layer.site.kind != "sdpa":
        raise TpcError(f"{what} {layer.index} has no scaled_dot_product_attention in the captured graph "
                       f"({layer.site.node.name} is softmax(q·kᵀ)·v written out): load the model with "
                       "attn_implementation='sdpa'")
    return DecoderLayer(layer.index, layer.first, layer.site.node)


def _stacks(gm: fx.GraphModule) -> list[list[Layer]]:
    found = list(stacks(find_layers(gm)).values())
    if not found:
        raise TpcError("no decoder layers with attention in the captured prefill: load the model with "
                       "attn_implementation='sdpa'")
    return found


def decoder_layers(gm: fx.GraphModule) -> list[DecoderLayer]:
    """The language model's decoder layers: the last stack of layers in graph order."""
    return [_sdpa(layer, "decoder layer") for layer in _stacks(gm)[-1]]


def visual_mask(gm: fx.GraphModule, image_token_id: int) -> fx.Node:
    """The ``input_ids == image_token_id`` node that places the image features in the prompt."""
    for node in gm.graph.nodes:
        if not is_op(node, aten.masked_scatter):
            continue
        mask = node.args[1]
        while is_op(mask, aten.unsqueeze, aten.expand, aten._to_copy, aten.to):
            mask = mask.args[0]
        if is_op(mask, aten.eq) and mask.args[1] == image_token_id and getattr(mask.args[0], "op", None) == "placeholder":
            return mask
    raise TpcError(f"no image-placeholder mask (input_ids == {image_token_id} feeding masked_scatter) in the captured "
                   "graph: tpc finds the visual tokens from it")


def prompt_mask(gm: fx.GraphModule) -> fx.Node:
    """The prefill's ``attention_mask`` input ([B, S]: 1 at real prompt tokens, 0 at padding)."""
    found = gm.graph.find_nodes(op="placeholder", target="attention_mask")
    if not found:
        raise TpcError("the captured prefill has no attention_mask input: tpc reads the padding from it")
    return found[0]


def vision_attention(gm: fx.GraphModule, index: int) -> DecoderLayer:
    """Vision-tower layer ``index``'s self-attention (the stack before the language model's: topk-cls
    reads its [CLS] row, or the attention its patches receive)."""
    found = _stacks(gm)
    tower = found[-2] if len(found) > 1 else []
    layer = next((layer for layer in tower if layer.index == index), None)
    if layer is None:
        raise TpcError(f"vision layer {index} has no self-attention in the captured graph; topk-cls needs its one "
                       "self-attention (load the model with attn_implementation='sdpa')")
    return _sdpa(layer, "vision layer")
