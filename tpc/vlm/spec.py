"""``VlmSpec``: what tpc reads from a VLM's config (below the families and the input checks that use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VlmSpec:
    """What tpc needs to know about a VLM, read from its config."""

    family: str
    image_token_id: int
    tokens_per_image: int | None  # None: it depends on the image's size (Qwen2-VL)
    num_layers: int  # decoder layers of the language model
    vision_layers: int
    vision_cls: bool  # the vision tower has a [CLS] token
    vision_tower: str  # class name, for reports
    tower_in_graph: bool = True  # False: the vision encoder runs eagerly before the captured prefill
