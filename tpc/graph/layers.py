"""The layers a graph's attention sites sit in, and the stacks of layers they form.

An encoder's layers are its attention sites in graph order (:func:`find_attention_sites`). A
graph with several stacks (a VLM's vision tower, then its language model) also needs to know
which stack a site belongs to and its index there. Both come from the same analysis: each site
found by :func:`find_attention_sites`, and the innermost numbered module on its node's
``nn_module_stack`` (``model.language_model.layers.2``: a ModuleList's child), which is its
layer; that module's parent (``model.language_model.layers``) is the stack. No module names
are assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from tpc.errors import TpcError
from tpc.graph.attention import AttentionSite, find_attention_sites


@dataclass(frozen=True)
class Layer:
    """One numbered layer of a stack that holds an attention site."""

    stack: str  # the stack's module path: model.language_model.layers
    index: int  # the layer's number in its stack
    first: fx.Node  # the layer's first node in graph order
    site: AttentionSite  # its attention

    @property
    def path(self) -> str:
        return f"{self.stack}.{self.index}"


def layer_path(node: fx.Node) -> tuple[str, int] | None:
    """(stack, index) of the innermost numbered module on ``node``'s module stack, or None."""
    for path, _cls in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        stack, _, last = path.rpartition(".") if isinstance(path, str) else ("", "", "")
        if stack and last.isdigit():
            return stack, int(last)
    return None


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every layer holding an attention site, in graph order; a site outside a numbered layer is
    left out, and a layer running two attentions is refused (tpc expects one self-attention per layer)."""
    found: dict[tuple[str, int], AttentionSite] = {}
    for site in find_attention_sites(gm):
        key = layer_path(site.node)
        if key is None:
            continue
        if key in found:
            raise TpcError(f"layer {key[0]}.{key[1]} runs attention twice ({found[key].node.name}, {site.node.name}); "
                           "tpc expects one self-attention per layer")
        found[key] = site
    first: dict[tuple[str, int], fx.Node] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, _cls in stack.values():
            stack_path, _, last = path.rpartition(".") if isinstance(path, str) else ("", "", "")
            key = (stack_path, int(last)) if last.isdigit() else None
            if key in found:
                first.setdefault(key, node)
    return [Layer(*key, first[key], site) for key, site in sorted(found.items(), key=lambda kv: kv[1].layer)]


def stacks(layers: list[Layer]) -> dict[str, list[Layer]]:
    """The layers grouped by stack, stacks in graph order, each stack's layers by index."""
    out: dict[str, list[Layer]] = {}
    for layer in layers:
        out.setdefault(layer.stack, []).append(layer)
    return {stack: sorted(group, key=lambda layer: layer.index) for stack, group in out.items()}
