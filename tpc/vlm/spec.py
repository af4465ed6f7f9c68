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


@dataclass(frozen=True)
class VisionScoring:
    """How topk-cls scores a VLM's visual tokens from its vision tower (``Family.cls_scoring``).

    ``rule`` "cls": VTC-CLS, the [CLS] query's head-mean attention over the patches; "received":
    for a tower without [CLS], the attention each patch receives (mean over heads and queries).
    Several ``layers``: their scores are summed (VTC-CLS's ensemble). ``drop``: leading tower
    tokens that are not visual tokens (LLaVA's [CLS] under the "default" strategy). ``shuffle``:
    the connector's pixel-shuffle factor s (SmolVLM), s² patches per visual token; 1: one patch each.
    """

    layers: tuple[int, ...]
    rule: str = "cls"
    drop: int = 0
    shuffle: int = 1

    def describe(self) -> str:
        which = f"vision layer {self.layers[0]}" if len(self.layers) == 1 else \
            f"vision layers {', '.join(map(str, self.layers))}, summed"
        return f"[CLS] attention of {which}" if self.rule == "cls" else f"attention received at {which}"
