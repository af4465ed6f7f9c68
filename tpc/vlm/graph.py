"""Read-only analysis of a captured VLM prefill: the visual tokens and the decoder layers.

The visual tokens are found from the graph itself: the boolean mask ``input_ids ==
image_token_id`` that feeds ``masked_scatter`` of the image features into the prompt's
embeddings. It is a [B, S] tensor, so every example has its own visual span (prompts of
different lengths, left padding). Decoder layers are the nodes whose ``nn_module_stack``
holds ``language_model.layers.<i>`` (``text_model.layers.<i>`` in SmolVLM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from tpc.errors import TpcError
from tpc.graph.nodes import is_op, val

aten = torch.ops.aten
_LAYER = re.compile(r"(?:^|\.)(?:language_model|text_model)\.layers\.(\d+)$")
_VISION_LAYER = re.compile(r"(?:^|\.)vision_tower\.(?:vision_model\.)?(?:encoder\.)?layers\.(\d+)$")  # CLIP, ViT


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


def layer_of(node: fx.Node, pattern: re.Pattern = _LAYER) -> int | None:
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        match = pattern.search(path) if isinstance(path, str) else None
        if match:
            return int(match.group(1))
    return None


def decoder_layers(gm: fx.GraphModule) -> list[DecoderLayer]:
    first: dict[int, fx.Node] = {}
    attention: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        index = layer_of(node)
        if index is None:
            continue
        first.setdefault(index, node)
        if is_op(node, aten.scaled_dot_product_attention):
            if index in attention:
                raise TpcError(f"decoder layer {index} runs attention twice ({attention[index].name}, {node.name}); "
                               "tpc expects one self-attention per decoder layer")
            attention[index] = node
    missing = sorted(set(first) - set(attention))
    if missing:
        raise TpcError(f"decoder layer {missing[0]} has no scaled_dot_product_attention in the captured graph: "
                       "load the model with attn_implementation='sdpa'")
    return [DecoderLayer(i, first[i], attention[i]) for i in sorted(first)]


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
    """Vision-tower layer ``index``'s self-attention (LLaVA's CLIP or ViT tower: VTC-CLS reads its [CLS] row)."""
    nodes = [n for n in gm.graph.nodes if layer_of(n, _VISION_LAYER) == index]
    attention = [n for n in nodes if is_op(n, aten.scaled_dot_product_attention)]
    if len(attention) != 1:
        raise TpcError(f"vision layer {index} has {len(attention)} scaled_dot_product_attention calls in the captured "
                       "graph; VTC-CLS needs its one self-attention (load the model with attn_implementation='sdpa')")
    return DecoderLayer(index, nodes[0], attention[0])
