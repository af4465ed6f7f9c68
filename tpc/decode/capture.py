"""Capture a decoder language model's decode step with ``torch.export``.

The decode step takes one new token per sequence and the KV cache as graph inputs:

    step(input_ids [B, 1], position_ids [B, 1], attention_mask [B, L + 1], past) ->
        (logits [B, vocab], new keys and values of every layer, each [B, Hkv, 1, d])

``past`` is the flat list (k_0, v_0, k_1, v_1, …) of [B, Hkv, L, d] tensors. Batch and
cache length L are symbolic, so one capture serves every batch and every prompt length.
The stock model runs unchanged (no module patched): its cache is a transformers
``DynamicCache`` whose layers hold the given tensors and remember the new token's keys and
values, which are the step's outputs; appending them to the cache is the caller's job, so
the step itself never copies a cache it does not read.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.export import Dim

from tpc.capture import eval_mode
from tpc.errors import TpcError, refusal_or_bug
from tpc.registry import METHODS, Where, methods_for

MAX_BATCH = 4096
MAX_CACHE = 1 << 20


def decoder_spec(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head width) of a decoder language model; refuses anything else."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not name.endswith("ForCausalLM") or not getattr(config, "num_hidden_layers", None):
        if getattr(config, "vision_config", None) is not None:
            raise TpcError(f"{name} is a VLM: its decode takes a decode-time method after its visual tokens are pruned, "
                           "e.g. method='divprune', decode={'method': 'h2o', 'keep': 256} (--pass divprune --decode h2o "
                           "--decode-keep 256)")
        raise TpcError(f"{name} has no KV cache to decode from: decode-time sparse attention and a compressed KV cache "
                       "take a decoder language model such as LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM")
    return _spec(config)


def _spec(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, width


def step_spec(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head width) of the language model whose decode step tpc captures: a decoder LM's
    own, or a VLM's (its ``text_config``: the decoder whose step ``tpc.vlm.decode`` captures)."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        return _spec(config.text_config)
    return decoder_spec(model)


def is_decoder_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates from its own outputs (``can_generate()``: a causal LM), not a VLM
    (a config with a ``vision_config``: LLaVA, Qwen2-VL, SmolVLM and the VLMs tpc does not know) or an
    encoder-decoder: its forward returns a KV cache, and its tokens are pruned at decode time."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return (callable(can_generate) and bool(can_generate()) and getattr(config, "vision_config", None) is None
            and not getattr(config, "is_encoder_decoder", False))


def refuse_encoder_method(model: nn.Module, name: str, method: str | None = None) -> None:
    """One line, before any capture, when a method that does not prune at decode time (by the registry's
    capabilities) is given a decoder-only LM (torch.export would fail on the returned ``DynamicCache``)."""
    known = METHODS.get(method)
    if not is_decoder_lm(model) or (known is not None and known.applies(Where.DECODE, Where.KV_EVICTION)):
        return
    what = (f"{method} prunes {' and '.join(w.value for w in Where if w in known.impl)}" if known is not None
            else "without a decode-time method tpc prunes encoder tokens")
    named = name if name == type(model).__name__ else f"{name} ({type(model).__name__})"
    raise TpcError(f"{named} is a decoder-only language model and {what}: for a decoder-only LM use a decode-time "
                   f"method (--pass {' or '.join(methods_for(Where.DECODE))}) or a compressed KV cache (--pass "
                   f"{' or '.join(methods_for(Where.KV_EVICTION))}), see docs/decode.md")


def step_cache(past: list[torch.Tensor]):
    """A ``DynamicCache`` over the given tensors whose layers remember what ``update`` appends."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class StepLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            self.new = (key_states, value_states)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = []
    for i in range(0, len(past), 2):
        layer = StepLayer()
        layer.is_initialized, layer.device, layer.keys, layer.values = True, past[i].device, past[i], past[i + 1]
        cache.layers.append(layer)
    return cache


class DecodeStep(nn.Module):
    """The model's forward on one new token over a given cache (the module torch.export captures)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor]):
        cache = step_cache(past)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=True)
        return out.logits[:, -1], *(t for layer in cache.layers for t in layer.new)


def example_step(model: nn.Module, batch: int = 2, length: int = 8) -> tuple:
    """Inputs of one decode step at ``batch`` × ``length`` cached positions (random cache)."""
    layers, heads, width = step_spec(model)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    past = [torch.randn(batch, heads, length, width, generator=gen).to(dtype) for _ in range(2 * layers)]
    ids = torch.zeros(batch, 1, dtype=torch.long)
    return ids, torch.full((batch, 1), length), torch.ones(batch, length + 1, dtype=torch.long), past


def capture_step(model: nn.Module, chunk: bool = False, step: nn.Module | None = None) -> torch.export.ExportedProgram:
    """The decode step as an aten program, symbolic in batch and cache length. ``chunk``: the step
    takes T new tokens (T symbolic, 1 or more; input_ids and position_ids [B, T], attention_mask
    [B, L + T]), so one program serves the prefill (over a one-position masked cache) and every
    decode step of a compressed cache. ``step``: the module captured, taking the decode step's inputs
    (default ``DecodeStep(model)``; a VLM's language model and head: ``tpc.vlm.decode.TextStep``)."""
    layers = (decoder_spec(model) if step is None else step_spec(model))[0]
    args = example_step(model)
    batch, cache = Dim("batch", min=1, max=MAX_BATCH), Dim("cache", min=1, max=MAX_CACHE)
    dynamic = ({0: batch}, {0: batch}, {0: batch, 1: cache + 1}, [{0: batch, 2: cache}] * (2 * layers))
    if chunk:
        ids, _, mask, past = args
        args = (ids.repeat(1, 3), torch.arange(8, 11).repeat(ids.shape[0], 1), mask[:, :1].repeat(1, 11), past)
        new = Dim("new", min=1, max=MAX_CACHE)
        dynamic = ({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: Dim.AUTO}, dynamic[3])
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(step if step is not None else DecodeStep(model), args, dynamic_shapes=dynamic)
        except Exception as err:  # torch.export raises many types; the user needs one line, tpc's bugs a report
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise refusal_or_bug(err, f"torch.export could not capture the decode step of {type(model).__name__}: "
                                      f"{first}") from err
