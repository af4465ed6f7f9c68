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


def checked_mask(input_ids, attention_mask, pad_token_id=None, eos_token_id=None) -> torch.Tensor:
    """The prompts' attention mask, [B, S] int64, or one line on what is wrong with them.

    Without a mask, as ``generate()`` infers one: real tokens are those that are not the pad
    token, when the prompts hold it and it is not an end-of-sequence token; else every token.
    A mask may be bool, int or float, holding 0 and 1 only, and every example a real token.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TpcError(f"input_ids must be [batch, tokens], got {shape}: pass the processor's input_ids")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TpcError(f"input_ids are {input_ids.dtype}: token ids are integers (the tokenizer's input_ids)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise TpcError(f"input_ids of shape {tuple(input_ids.shape)} hold no prompt: give at least one token")
    if attention_mask is None:
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if pad_token_id is None or pad_token_id in eos or not bool((input_ids == pad_token_id).any()):
            return torch.ones_like(input_ids, dtype=torch.long)
        attention_mask = input_ids != pad_token_id
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise TpcError(f"attention_mask {shape} does not match input_ids {tuple(input_ids.shape)}: give one 0 or 1 "
                       "per token")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise TpcError("attention_mask holds values other than 0 and 1: 1 marks a real token, 0 padding")
    mask = attention_mask.long()
    empty = torch.nonzero(mask.sum(1) == 0)
    if len(empty):
        raise TpcError(f"example {int(empty[0, 0])} of the batch is all padding (its attention_mask is all 0): "
                       "give every example at least one real token")
    return mask


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
