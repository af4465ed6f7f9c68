"""``generate()`` as Hugging Face's, for tpc's own decoders (the pruned VLM, decode-time sparse attention).

The settings are a ``GenerationConfig`` built as ``model.generate(**kwargs)`` builds it, refusing
in one line any setting this loop does not implement; the loop is greedy or sampled (temperature,
top-k, top-p warpers in ``generate()``'s order), a finished example is padded with the pad token,
and it stops when every example has ended or ``max_new_tokens`` are drawn. Prompts are
left-padded, as for ``model.generate()``: each continues from its last token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from tpc.errors import TpcError

if TYPE_CHECKING:  # transformers is an optional dependency: `import tpc` must work without it
    from transformers import GenerationConfig, LogitsProcessorList

# Generation settings this decoder does not implement, with the values that leave generate() unchanged:
# any other value would make tokens differ from model.generate's without a word.
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
            "encoder_repetition_penalty": 1.0, "typical_p": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "diversity_penalty": 0.0, "penalty_alpha": None, "bad_words_ids": None, "min_p": None,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": None,
            "exponential_decay_length_penalty": None, "watermarking_config": None, "prompt_lookup_num_tokens": None,
            "top_h": None, "stop_strings": None, "max_time": None, "return_dict_in_generate": False,
            "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False}
_SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
              "pad_token_id", "bos_token_id"}


def generation_config(base: GenerationConfig, given: dict, max_new_tokens: int | None,
                      do_sample: bool | None) -> GenerationConfig:
    """The model's ``generation_config`` updated by the call's settings; one line for a setting
    transformers refuses (``max_new_tokens=0``) or this loop does not implement."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig(**{**base.to_dict(), **given,
                                     **({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}),
                                     **({"do_sample": do_sample} if do_sample is not None else {})})
        if config.do_sample:
            _warpers(config)  # the sampling warpers check theirs (temperature=0, top_p over 1) before the prefill
    except ValueError as err:  # transformers' own check of the settings, e.g. max_new_tokens=0
        raise TpcError(f"generate(): {str(err).strip().splitlines()[0]}") from None
    refuse_unsupported(config, given)
    return config


def refuse_unsupported(config: GenerationConfig, given: dict) -> None:
    """One line for a generation setting ``generate`` would otherwise ignore (from the call or the model's config)."""
    unknown = sorted(k for k in given if k not in _SUPPORTED and k not in _NEUTRAL)
    if unknown:
        raise TpcError(f"generate() of a pruned model has no option {unknown[0]!r}: it takes "
                       f"{', '.join(sorted(_SUPPORTED))}")
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            where = "given" if name in given else "set in the model's generation_config"
            raise TpcError(f"generate() of a pruned model does greedy or sampled decoding with temperature/top-k/top-p "
                           f"only; {name}={value!r} ({where}) is not implemented: pass {name}={neutral!r}")


def refuse_right_padding(attention_mask) -> None:
    """generate() continues every prompt from its last position: a padded last position would be continued."""
    if attention_mask is not None and not bool(attention_mask[:, -1].bool().all()):
        rows = torch.nonzero(~attention_mask[:, -1].bool())[:, 0].tolist()
        raise TpcError(f"example {rows[0]} of the batch is right-padded: generate() continues each prompt from its "
                       "last token; pad on the left (the processor's padding_side='left'), as for model.generate()")


# generate()'s new tokens when neither max_new_tokens nor max_length is set (transformers' model-agnostic default)
DEFAULT_NEW_TOKENS = 20


def new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    """How many tokens ``generate`` draws at most: ``max_new_tokens``, else up to ``max_length``, else 20, as
    ``model.generate()``; one line for a ``max_length`` that leaves no room after the prompt (``generate()``
    refuses it too)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is None:
        return DEFAULT_NEW_TOKENS
    if config.max_length <= prompt_length:
        raise TpcError(f"generate(): max_length {config.max_length} leaves no room for a new token after the "
                       f"{prompt_length}-token prompts: set max_new_tokens (or a max_length over {prompt_length})")
    return config.max_length - prompt_length


def decode_tokens(input_ids: torch.Tensor, logits: torch.Tensor, config: GenerationConfig,
                  step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Prompt and new tokens, [B, S + new]: ``logits`` [B, vocab] are the prefill's last; ``step``
    takes the drawn tokens [B, 1] and returns the next logits (the caller's decoder and cache)."""
    eos = config.eos_token_id
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    warpers = _warpers(config)
    new = new_tokens(config, input_ids.shape[1])
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    tokens = [input_ids]
    with torch.no_grad():
        for index in range(new):
            if config.do_sample:
                scores = warpers(torch.cat(tokens, 1), logits)
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            tokens.append(token[:, None])
            unfinished &= ~torch.isin(token, eos)
            if not unfinished.any() or index == new - 1:
                break
            logits = step(token[:, None])
    return torch.cat(tokens, 1)


def _warpers(config: GenerationConfig) -> LogitsProcessorList:
    """Sampling warpers in the order ``generate()`` applies them."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return out


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
