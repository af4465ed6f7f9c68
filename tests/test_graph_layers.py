"""The shared layer finder (tpc/graph/layers.py): attention sites grouped by the numbered layer and
stack they sit in, which the VLM path reads its decoder and vision layers from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpc.capture import capture
from tpc.errors import TpcError
from tpc.graph.layers import find_layers, stacks
from tpc.vlm.graph import decoder_layers, vision_attention


class Block(nn.Module):
    def __init__(self, sdpa: bool = True):
        super().__init__()
        self.qkv, self.sdpa = nn.Linear(8, 24), sdpa

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        probs = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        return x + (probs @ v).transpose(1, 2).flatten(2)


class Stack(nn.Module):
    def __init__(self, depth: int, sdpa: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(Block(sdpa) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TwoStacks(nn.Module):
    """A vision tower of 2 layers, then a language model of 3 (names no finder knows)."""

    def __init__(self, lm_sdpa: bool = True):
        super().__init__()
        self.tower, self.lm = Stack(2), Stack(3, lm_sdpa)

    def forward(self, x):
        return self.lm(self.tower(x))


def test_layers_are_grouped_into_stacks_in_graph_order():
    gm = capture(TwoStacks(), (torch.randn(2, 5, 8),), dynamic_length=False)
    layers = find_layers(gm)
    assert [(layer.stack, layer.index) for layer in layers] == [("tower.layers", 0), ("tower.layers", 1),
                                                                ("lm.layers", 0), ("lm.layers", 1), ("lm.layers", 2)]
    assert list(stacks(layers)) == ["tower.layers", "lm.layers"]
    assert all(layer.first.meta["nn_module_stack"] for layer in layers)
    assert [layer.index for layer in decoder_layers(gm)] == [0, 1, 2]  # the last stack: the language model
    assert vision_attention(gm, 1).attention is layers[1].site.node  # the stack before it: the tower
    with pytest.raises(TpcError, match="vision layer 2 has no self-attention"):
        vision_attention(gm, 2)


@pytest.mark.slow
def test_a_written_out_attention_in_the_language_model_is_refused_in_one_line():
    gm = capture(TwoStacks(lm_sdpa=False), (torch.randn(2, 5, 8),), dynamic_length=False)
    assert [layer.site.kind for layer in find_layers(gm)] == ["sdpa"] * 2 + ["explicit"] * 3
    with pytest.raises(TpcError, match="decoder layer 0 has no scaled_dot_product_attention") as err:
        decoder_layers(gm)
    assert "\n" not in str(err.value)
