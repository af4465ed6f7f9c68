"""Checks on a VLM's processor outputs, and the positions ``generate()`` gives a prompt."""

from __future__ import annotations

import torch

from tpc.errors import TpcError
from tpc.vlm.spec import VlmSpec


def visual_per_example(spec: VlmSpec, input_ids: torch.Tensor, images: int, features: int) -> int:
    """The number of visual tokens in every example's prompt; one line refusing anything else.

    ``images`` images make ``features`` visual tokens (what the vision encoder returns).
    """
    if input_ids.dim() != 2:
        raise TpcError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    counts = (input_ids == spec.image_token_id).sum(1).tolist()
    if min(counts) == 0:
        raise TpcError(f"no image token (id {spec.image_token_id}) in the prompt of example {counts.index(0)}: "
                       "put the processor's image placeholder in every prompt")
    if len(set(counts)) != 1:
        raise TpcError(f"the examples hold different numbers of image tokens {counts}: give every prompt the same "
                       "number of images")
    if sum(counts) != features:
        each = f" ({spec.tokens_per_image} per image)" if spec.tokens_per_image else ""
        raise TpcError(f"the prompts hold {sum(counts)} image tokens but {images} images make {features} visual "
                       f"tokens{each}: give one image per placeholder group")
    if images % input_ids.shape[0]:
        raise TpcError(f"{images} images do not split evenly over {input_ids.shape[0]} prompts")
    return counts[0]


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] positions as ``generate()`` assigns them: count of real tokens before, 0 at padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def layer_valid(attention_mask: torch.Tensor, stages: list, kept: list[torch.Tensor], layers: int
                ) -> list[torch.Tensor]:
    """Per decoder layer, [B, tokens it saw] bool: which of its tokens (its cached keys) are real
    prompt tokens, not padding; ``stages``: the pruning steps (their ``layer``, -1 before the LM), ``kept``:
    each stage's kept positions in the prompt."""
    valid, mask, stage = [], attention_mask.bool(), 0
    for i in range(layers):
        while stage < len(stages) and stages[stage].layer < i:
            mask = attention_mask.bool().gather(1, kept[stage])
            stage += 1
        valid.append(mask)
    return valid
