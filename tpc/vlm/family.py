"""Which VLM a module is, and the prefill tpc captures from its stock submodules.

LLaVA (``LlavaForConditionalGeneration``): the vision tower's hidden states at
``vision_feature_layer`` ([CLS] dropped under the "default" strategy) go through the
projector and are scattered into the prompt's embeddings at the image-placeholder tokens;
the language model runs on the result. ``LlavaPrefill`` composes exactly those stock modules
(nothing is patched) because ``LlavaModel.forward`` turns the image batch into a Python list,
which fixes the batch size in any capture; it returns the logits and every layer's keys and
values, so the captured prefill fills the KV cache ``generate()`` decodes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpc.errors import TpcError


@dataclass(frozen=True)
class VlmSpec:
    """What tpc needs to know about a VLM, read from its config."""

    family: str
    image_token_id: int
    tokens_per_image: int
    num_layers: int  # decoder layers of the language model
    vision_layers: int
    vision_cls: bool  # the vision tower has a [CLS] token
    vision_tower: str  # class name, for reports


def is_vlm(model) -> bool:
    return type(model).__name__ in FAMILIES


def refuse_vlm(model, command: str) -> None:
    """One line for a command that does not take VLMs yet (they compile and export only)."""
    if is_vlm(model):
        raise TpcError(f"tpc {command} does not take vision-language models yet ({type(model).__name__}): use tpc "
                       "compile / inspect, or benchmarks/vlm_speed.py for speed (docs/vlm.md)")


def spec_of(model: nn.Module) -> VlmSpec:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TpcError(f"{name} is not a VLM tpc knows: supported are {', '.join(FAMILIES)}")
    return FAMILIES[name].spec(model)


def prefill_module(model: nn.Module) -> nn.Module:
    return FAMILIES[type(model).__name__](model)


def example_inputs(model: nn.Module, batch: int = 2, text: int = 8, seed: int = 0) -> dict:
    """Processor-like inputs when none are given: each prompt one image's placeholders between text."""
    spec = spec_of(model)
    vision = model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    words = torch.randint(3, min(vocab, 1000), (batch, text + 1), generator=gen)
    words = words.masked_fill(words == spec.image_token_id, 3)
    ids = torch.cat([words[:, :1], torch.full((batch, spec.tokens_per_image), spec.image_token_id), words[:, 1:]], 1)
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def language_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder stack with ``embed_tokens``/``layers``/``norm``/``rotary_emb``, the LM head)."""
    return model.model.language_model, model.lm_head


class LlavaPrefill(nn.Module):
    """LLaVA's prefill: (logits, k_0, v_0, …, k_{L-1}, v_{L-1}) from the stock submodules."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise TpcError("LLaVA with several vision feature layers is not supported yet: use one vision_feature_layer")
        self.feature_layer = cfg.vision_feature_layer
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.image_token_id = cfg.image_token_id

    def forward(self, input_ids, pixel_values, attention_mask, position_ids):
        core = self.model.model
        embeds = core.get_input_embeddings()(input_ids)
        tower = core.vision_tower(pixel_values, output_hidden_states=True)
        features = tower.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        features = core.multi_modal_projector(features)
        placeholder = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(placeholder, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        out = core.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *kv)

    @staticmethod
    def spec(model: nn.Module) -> VlmSpec:
        cfg = model.config
        vc = cfg.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        has_cls = hasattr(model.model.vision_tower, "vision_model") and hasattr(
            model.model.vision_tower.vision_model.embeddings, "class_embedding")
        tokens = patches + (1 if has_cls and cfg.vision_feature_select_strategy != "default" else 0)
        return VlmSpec("llava", int(cfg.image_token_id), tokens, int(cfg.text_config.num_hidden_layers),
                       int(vc.num_hidden_layers), has_cls, type(model.model.vision_tower).__name__)


FAMILIES = {"LlavaForConditionalGeneration": LlavaPrefill}
