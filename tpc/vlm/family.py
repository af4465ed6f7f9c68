"""Which VLM a module is, the prefill tpc captures from its stock submodules, and the eager
steps around that capture.

Every family's captured prefill takes ``(input_ids, visual, attention_mask, position_ids)``
and returns ``(logits, k_0, v_0, …, k_{L-1}, v_{L-1})``: it embeds the prompt, scatters
the image features into it at the image-placeholder tokens (``input_ids == image_token_id``
feeding ``masked_scatter``, where tpc finds the visual tokens), and runs the language model
and its head. What differs is ``visual`` and the positions:

* **LLaVA** (``LlavaForConditionalGeneration``): ``visual`` is ``pixel_values``; the vision
  tower ([CLS] dropped under the "default" strategy) and the projector are in the graph.
  ``LlavaModel.forward`` turns the image batch into a Python list, which fixes the batch
  size in any capture, so tpc captures a wrapper calling the same stock modules in order.
  Positions [B, S]: ``cumsum(attention_mask) - 1`` as ``generate()`` assigns them.
* **Qwen2-VL** (``Qwen2VLForConditionalGeneration``): its vision encoder splits the patch
  sequence by each image's grid (a data-dependent split ``torch.export`` cannot capture),
  so it runs eagerly and ``visual`` is its output, [B, V, hidden]; the graph is the
  language model fed with the scattered embeddings and the 3-D M-RoPE positions
  [3, B, S] (temporal, height, width) of the model's own ``get_rope_index``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from tpc.errors import TpcError
from tpc.vlm.inputs import prompt_positions, visual_per_example
from tpc.vlm.spec import VisionScoring, VlmSpec


def is_vlm(model) -> bool:
    return type(model).__name__ in FAMILIES


def names_a_vlm(model_id, unreadable: bool = False) -> bool:
    """Whether a model directory's config.json names a VLM class tpc knows (read as JSON, nothing
    loaded); ``unreadable`` when there is no config.json tpc can read as JSON."""
    try:
        config = json.loads((Path(model_id) / "config.json").read_text())
    except (OSError, ValueError, TypeError, RecursionError):
        return unreadable
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(a in FAMILIES for a in architectures if isinstance(a, str))


def refuse_vlm(model, command: str) -> None:
    """One line for a command that does not take VLMs yet (they compile and export only)."""
    if is_vlm(model):
        raise TpcError(f"tpc {command} does not take vision-language models yet ({type(model).__name__}): use tpc "
                       "compile / inspect / bench (docs/vlm.md)")


def family_of(model: nn.Module) -> Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TpcError(f"{name} is not a VLM tpc knows: supported are {', '.join(FAMILIES)}")
    return FAMILIES[name](model)


def spec_of(model: nn.Module) -> VlmSpec:
    return family_of(model).spec()


def prefill_module(model: nn.Module) -> nn.Module:
    return family_of(model).prefill()


def example_inputs(model: nn.Module, batch: int = 2, text: int = 8, seed: int = 0) -> dict:
    """Processor-like inputs when none are given: each prompt one image's placeholders between text."""
    return family_of(model).example_inputs(batch, text, seed)


def language_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder stack with ``embed_tokens``/``layers``/``norm``/``rotary_emb``, the LM head)."""
    core = model.model
    return (core.text_model if hasattr(core, "text_model") else core.language_model), model.lm_head


class Family(ABC):
    """A VLM family: its spec, the module tpc captures, and the eager steps that feed it."""

    # (batch axis, token axis or None) of each graph input: input_ids, visual, attention_mask, position_ids
    AXES: tuple = ((0, 1), (0, None), (0, 1), (0, 1))
    INPUTS: tuple = ()  # processor outputs it reads besides input_ids, pixel_values, attention_mask

    def __init__(self, model: nn.Module):
        self.model = model

    @abstractmethod
    def spec(self) -> VlmSpec:
        """The spec tpc's passes read (towers, token ids, layers)."""

    @abstractmethod
    def prefill(self) -> nn.Module:
        """The module tpc captures for the prefill."""

    @abstractmethod
    def graph_args(self, inputs: dict) -> tuple[tuple, int]:
        """(the captured prefill's inputs, visual tokens per example) from processor outputs."""

    @abstractmethod
    def example_inputs(self, batch: int, text: int, seed: int) -> dict:
        """Seeded processor-like inputs for capture: ``batch`` prompts of ``text`` text tokens."""

    def cls_scoring(self, vision_layer) -> VisionScoring:
        """How topk-cls scores the visual tokens from the vision tower: ``vision_layer`` is None (the
        family's default layer), one layer, or a list of layers whose scores are summed."""
        raise TpcError(f"{self.spec().vision_tower} has no [CLS] token, so topk-cls (VTC-CLS) cannot score its "
                       "visual tokens: use fastv, divprune, kcenter or random")

    def _text(self, batch: int, text: int, visual: int, gen: torch.Generator) -> torch.Tensor:
        vocab = self.model.config.text_config.vocab_size
        image = self.spec().image_token_id
        words = torch.randint(3, min(vocab, 1000), (batch, text + 1), generator=gen)
        words = words.masked_fill(words == image, 3)
        return torch.cat([words[:, :1], torch.full((batch, visual), image), words[:, 1:]], 1)

    def dynamic_shapes(self, args: tuple, visual: int, text: int = 0) -> tuple:
        """Symbolic batch and prompt length; an input holding several rows per example (LLaVA's
        images) gets a multiple of the batch. A prompt holds its visual tokens and ``text`` more."""
        batch, seq = Dim("batch", min=1, max=4096), Dim("prompt", min=visual + text, max=131072)
        examples = args[0].shape[0]
        out = []
        for arg, (batch_axis, token_axis) in zip(args, self.AXES):
            rows = arg.shape[batch_axis] // examples
            shape = {batch_axis: batch * rows if rows > 1 else batch}
            if token_axis is not None:
                shape[token_axis] = seq
            out.append(shape)
        return tuple(out)

    def first_example(self, args: tuple) -> tuple:
        examples = args[0].shape[0]
        return tuple(a.narrow(axis, 0, a.shape[axis] // examples) for a, (axis, _) in zip(args, self.AXES))

    def twice(self, args: tuple) -> tuple:
        """The batch repeated (a batch of one would be captured as a constant)."""
        return tuple(torch.cat([a, a], axis) for a, (axis, _) in zip(args, self.AXES))


class Llava(Family):
    def spec(self) -> VlmSpec:
        model = self.model
        cfg = model.config
        vc = cfg.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        tower = model.model.vision_tower
        embeddings = getattr(tower, "vision_model", tower).embeddings
        has_cls = any(hasattr(embeddings, name) for name in ("class_embedding", "cls_token"))  # CLIP, ViT; not SigLIP
        tokens = patches + (1 if has_cls and cfg.vision_feature_select_strategy != "default" else 0)
        return VlmSpec("llava", int(cfg.image_token_id), tokens, int(cfg.text_config.num_hidden_layers),
                       int(vc.num_hidden_layers), has_cls, type(model.model.vision_tower).__name__)

    def prefill(self) -> nn.Module:
        return LlavaPrefill(self.model)

    def cls_scoring(self, vision_layer) -> VisionScoring:
        """VTC-CLS reads the [CLS] row of vision layers up to the feature layer (``vision_feature_layer``,
        whose output LLaVA projects; -2 in LLaVA-1.5): by default that layer itself; several layers
        are VTC-CLS's ensemble. A tower without [CLS] (SigLIP): the attention each patch receives."""
        spec, cfg = self.spec(), self.model.config
        feature = feature_layer(cfg) % (spec.vision_layers + 1) - 1  # hidden_states[i] is layer i-1's output
        layers = vision_layers(vision_layer, feature, "the layer LLaVA takes its image features from")
        return VisionScoring(layers, "cls" if spec.vision_cls else "received",
                             1 if cfg.vision_feature_select_strategy == "default" else 0)

    def graph_args(self, inputs: dict) -> tuple[tuple, int]:
        ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
        vc = self.model.config.vision_config
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (vc.num_channels, vc.image_size, vc.image_size):
            raise TpcError(f"LLaVA's vision tower takes pixel_values [images, {vc.num_channels}, {vc.image_size}, "
                           f"{vc.image_size}], got shape {tuple(pixels.shape)}: pass the processor's pixel_values")
        spec = self.spec()
        visual = visual_per_example(spec, ids, pixels.shape[0], pixels.shape[0] * spec.tokens_per_image)
        return (ids, pixels, mask, prompt_positions(mask)), visual

    def example_inputs(self, batch: int, text: int, seed: int) -> dict:
        vision = self.model.config.vision_config
        gen = torch.Generator().manual_seed(seed)
        ids = self._text(batch, text, self.spec().tokens_per_image, gen)
        pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def vision_layers(vision_layer, last: int, what: str) -> tuple[int, ...]:
    """``vision_layer`` (None: ``last``; one layer; a list or tuple of layers) as sorted layers in 0..last."""
    layers = [last] if vision_layer is None else list(vision_layer) if isinstance(vision_layer, (list, tuple)) \
        else [vision_layer]
    if not layers:
        raise TpcError(f"vision_layer {vision_layer!r} names no layer: give one vision layer or several, from 0 to "
                       f"{last} ({what})")
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= last for i in layers):
        raise TpcError(f"vision_layer {vision_layer!r}: choose a vision layer from 0 to {last} ({what})")
    if len(set(layers)) != len(layers):
        raise TpcError(f"vision_layer {vision_layer!r} names a layer twice: give each vision layer once")
    return tuple(sorted(layers))


def feature_layer(cfg) -> int:
    """LLaVA's ``vision_feature_layer`` (an index into the tower's hidden states)."""
    if not isinstance(cfg.vision_feature_layer, int):
        raise TpcError("LLaVA with several vision feature layers is not supported yet: use one "
                       "vision_feature_layer")
    return cfg.vision_feature_layer


class LlavaPrefill(nn.Module):
    """LLaVA's prefill: (logits, k_0, v_0, …, k_{L-1}, v_{L-1}) from the stock submodules."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.feature_layer = feature_layer(cfg)
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.image_token_id = cfg.image_token_id

    def forward(self, input_ids, pixel_values, attention_mask, position_ids):
        core = self.model.model
        tower = core.vision_tower(pixel_values, output_hidden_states=True)
        features = tower.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        return run_language_model(self.model, input_ids, core.multi_modal_projector(features), attention_mask,
                                  position_ids, self.image_token_id)


def run_language_model(model, input_ids, features, attention_mask, position_ids, image_token_id) -> tuple:
    """Embed, scatter ``features`` at the image tokens, run the language model: (logits, k_0, v_0, …)."""
    lm, _ = language_model(model)
    embeds = lm.get_input_embeddings()(input_ids)
    placeholder = (input_ids == image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(placeholder, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    logits = model.lm_head(out.last_hidden_state)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return (logits, *kv)


class Qwen2VL(Family):
    AXES = ((0, 1), (0, None), (0, 1), (1, 2))
    INPUTS = ("image_grid_thw", "mm_token_type_ids")

    def spec(self) -> VlmSpec:
        cfg = self.model.config
        return VlmSpec("qwen2-vl", int(cfg.image_token_id), None, int(cfg.text_config.num_hidden_layers),
                       int(cfg.vision_config.depth), False, type(self.model.model.visual).__name__, False)

    def prefill(self) -> nn.Module:
        return Qwen2VLPrefill(self.model)

    def cls_scoring(self, vision_layer) -> VisionScoring:
        raise TpcError(f"{self.spec().vision_tower} runs eagerly, outside the captured graph (its per-image split "
                       "is data-dependent), and has no [CLS] token, so topk-cls has no vision attention to score "
                       "with: use fastv, divprune, kcenter or random")

    def graph_args(self, inputs: dict) -> tuple[tuple, int]:
        """The vision encoder runs here, eagerly; M-RoPE positions from the model's ``get_rope_index``."""
        if inputs.get("pixel_values_videos") is not None:
            raise TpcError("Qwen2-VL video inputs are not supported: tpc prunes the visual tokens of images")
        ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise TpcError("Qwen2-VL needs the processor's image_grid_thw with its pixel_values")
        spec, core = self.spec(), self.model.model
        merge = self.model.config.vision_config.spatial_merge_size
        visual = visual_per_example(spec, ids, grid.shape[0], int((grid.prod(-1) // merge**2).sum()))
        types = inputs.get("mm_token_type_ids")
        types = (ids == spec.image_token_id).int() if types is None else types
        with torch.no_grad():
            features = torch.cat(core.get_image_features(pixels, grid).pooler_output)
            positions, _ = core.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
        return (ids, features.reshape(ids.shape[0], visual, -1), mask, positions), visual

    def example_inputs(self, batch: int, text: int, seed: int) -> dict:
        vc = self.model.config.vision_config
        side = 4 * vc.spatial_merge_size  # patches per side: 16 visual tokens per image
        gen = torch.Generator().manual_seed(seed)
        ids = self._text(batch, text, (side // vc.spatial_merge_size) ** 2, gen)
        pixels = torch.randn(batch * side * side, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                             generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                "image_grid_thw": torch.tensor([[1, side, side]] * batch),
                "mm_token_type_ids": (ids == self.spec().image_token_id).int()}


class Qwen2VLPrefill(nn.Module):
    """Qwen2-VL's language model on the prompt with the (eager) vision encoder's features scattered in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.image_token_id = model.config.image_token_id

    def forward(self, input_ids, image_features, attention_mask, position_ids):
        return run_language_model(self.model, input_ids, image_features, attention_mask, position_ids,
                                  self.image_token_id)


class SmolVLM(Family):
    """SmolVLM (Idefics3 family): a SigLIP-like tower without [CLS], pixel-shuffle connector, Llama decoder."""

    INPUTS = ("pixel_attention_mask",)

    def spec(self) -> VlmSpec:
        cfg = self.model.config
        return VlmSpec("smolvlm", int(cfg.image_token_id), int(self.model.model.image_seq_len),
                       int(cfg.text_config.num_hidden_layers), int(cfg.vision_config.num_hidden_layers), False,
                       type(self.model.model.vision_model).__name__)

    def prefill(self) -> nn.Module:
        return SmolVLMPrefill(self.model)

    def cls_scoring(self, vision_layer) -> VisionScoring:
        """No [CLS]: tpc scores a patch by the attention it receives (mean over heads and queries) at the
        chosen layers (default the last, whose output the connector takes), and a visual token by the
        mean over the s² patches the connector's pixel shuffle puts in it."""
        last = self.spec().vision_layers - 1
        layers = vision_layers(vision_layer, last, "the vision model's last layer feeds the connector")
        return VisionScoring(layers, "received", 0, int(self.model.config.scale_factor))

    def graph_args(self, inputs: dict) -> tuple[tuple, int]:
        ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
        if pixels.dim() != 5:
            raise TpcError(f"SmolVLM takes pixel_values [batch, images, channels, height, width] from its processor, "
                           f"got shape {tuple(pixels.shape)}")
        size = self.model.config.vision_config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise TpcError(f"SmolVLM's processor cuts images into {size}x{size} crops; got {pixels.shape[-2]}x"
                           f"{pixels.shape[-1]}: pass the processor's pixel_values")
        pixel_mask = inputs.get("pixel_attention_mask")
        if pixel_mask is not None and not bool(pixel_mask.bool().all()):
            raise TpcError("SmolVLM images with padded pixels (pixel_attention_mask not all 1) are not supported: give "
                           "every image of the batch the same size")
        if bool((pixels.flatten(2) == 0).all(-1).any()):
            raise TpcError("a SmolVLM example holds a padding image (all zeros): give every prompt the same number "
                           "of images")
        spec = self.spec()
        images = pixels.shape[0] * pixels.shape[1]
        visual = visual_per_example(spec, ids, images, images * spec.tokens_per_image)
        return (ids, pixels, mask, prompt_positions(mask)), visual

    def example_inputs(self, batch: int, text: int, seed: int) -> dict:
        vision = self.model.config.vision_config
        gen = torch.Generator().manual_seed(seed)
        ids = self._text(batch, text, self.spec().tokens_per_image, gen)
        pixels = torch.randn(batch, 1, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


class SmolVLMPrefill(nn.Module):
    """SmolVLM's prefill from its stock submodules: vision model (every patch real), connector,
    scatter, text model, head. ``SmolVLMModel.get_image_features`` drops padding images by a
    data-dependent index, which no capture keeps symbolic; tpc refuses padding images instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.image_token_id = model.config.image_token_id
        self.patch = model.config.vision_config.patch_size

    def forward(self, input_ids, pixel_values, attention_mask, position_ids):
        core = self.model.model
        pixels = pixel_values.flatten(0, 1).to(core.vision_model.embeddings.patch_embedding.weight.dtype)
        patches = torch.ones(pixels.shape[0], pixels.shape[2] // self.patch, pixels.shape[3] // self.patch,
                             dtype=torch.bool, device=pixels.device)
        hidden = core.vision_model(pixel_values=pixels, patch_attention_mask=patches).last_hidden_state
        return run_language_model(self.model, input_ids, core.connector(hidden), attention_mask, position_ids,
                                  self.image_token_id)


FAMILIES = {"LlavaForConditionalGeneration": Llava, "Qwen2VLForConditionalGeneration": Qwen2VL,
            "SmolVLMForConditionalGeneration": SmolVLM}
