"""A VLM's decode steps with decode-time sparse attention, after its pruned prefill.

``tpc.compile(vlm, inputs, method=…, keep=…, decode={"method": "tidal", "layers": [2, 15], "keep": 256})``
prunes the visual tokens of the prefill as ``compile_vlm`` does, and captures one decode step
of the VLM's language model (its text decoder and LM head, :class:`TextStep`) with the
signature of a decoder LM's step (``tpc/decode/capture.py``)::

    step(input_ids [B, 1], position_ids [B, 1], attention_mask [B, L + 1], past) -> (logits, new k, v …)

which the decode-time passes (TidalDecode, Quest, DHSA: ``tpc/decode``) rewrite unchanged, so
that the sparse layers read only the selected cache positions. ``VlmModule.generate`` runs the
pruned prefill, copies its cache into a ``KVBuffer`` and feeds every new token through that step.

Positions: a generated token's position continues from the unpruned prompt's largest one
(``last_position``); for Qwen2-VL's M-RoPE it is the same number on all three axes, and the
stock ``Qwen2VLTextModel`` expands a [B, 1] position to [3, B, 1] itself, so one step
signature serves the three families.

A compressed KV cache instead (``decode={"method": "h2o", "keep": 256}``: h2o, snapkv,
scissorhands, streaming; ``tpc/decode/compressed.py``): the same captured step, rewritten by
``EvictionScores`` to return each layer's scores, runs the decode steps of a ``CompressedDecoder``;
the pruned prefill, rewritten by ``PrefillScores`` (``tpc/vlm/scores.py``), returns the scores
its own queries give the cached prompt, so each layer's rule evicts from the prompt's cache
before the first new token, and after every step, and the cache holds the budget.

One cache length for every layer: the step takes one attention mask [B, L + 1] and one L for
all layers, so the combination is compiled when the visual tokens are pruned before the
language model (or not pruned): a stage inside the language model (fastv, a PyramidDrop
schedule: ``layers``) leaves each layer its own cache length, and is refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tpc import pipeline
from tpc.decode.capture import capture_step, step_cache, step_spec
from tpc.decode.compressed import CompressedDecoder, scoring
from tpc.decode.kv_methods import check_keep, eviction_rule, kv_eviction
from tpc.decode.plan import Plan, check_settings, make_plan
from tpc.decode.scores import EvictionScores
from tpc.errors import TpcError
from tpc.passes import PassManager
from tpc.registry import Where, methods_for
from tpc.vlm.family import language_model
from tpc.vlm.flops import prefill_flops
from tpc.vlm.module import decode_flags
from tpc.vlm.scores import PrefillScores

if TYPE_CHECKING:  # tpc.decode.module imports tpc.vlm (its checks on prompts): no import cycle at run time
    from tpc.decode.module import DecodeModule
    from tpc.vlm.module import VlmModule

KEYS = ("method", "layers", "keep", "options")


class TextStep(nn.Module):
    """The VLM's language model and head on one new token over a given cache (what torch.export captures);
    the stock submodules, unpatched, as ``tpc.decode.capture.DecodeStep`` runs a causal LM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm, self.head = language_model(model)

    def forward(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor]):
        cache = step_cache(past)
        out = self.lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                      use_cache=True)
        return self.head(out.last_hidden_state)[:, -1], *(t for layer in cache.layers for t in layer.new)


def capture_decode_step(model: nn.Module) -> torch.export.ExportedProgram:
    """The VLM's language-model decode step, symbolic in batch and cache length (reusable: see ``rewrite``)."""
    return capture_step(model, step=TextStep(model))


def decode_settings(decode) -> dict:
    """``decode=`` as {method, layers, keep, options} (a method name alone: its defaults), checked before any model
    is loaded; one line for anything that is neither decode-time sparse attention nor a compressed KV cache."""
    if isinstance(decode, str):
        decode = {"method": decode}
    if not isinstance(decode, dict):
        raise TpcError(f"decode is a decode-time method's settings such as {{'method': 'tidal', 'layers': [2, 15], "
                       f"'keep': 256}}, not {type(decode).__name__}")
    unknown = sorted(set(decode) - set(KEYS))
    if unknown:
        raise TpcError(f"decode has no key {unknown[0]!r}: it takes {', '.join(KEYS)}")
    method = decode.get("method")
    if method is None:
        raise TpcError(f"decode needs a method: one of {', '.join(methods_for(Where.DECODE, Where.KV_EVICTION))}")
    options = decode.get("options")
    if options is not None and not isinstance(options, dict):
        raise TpcError(f"decode options are a dict such as {{'page': 16}}, not {type(options).__name__}")
    if kv_eviction(method):
        if decode.get("layers") is not None:
            raise TpcError(f"{method} (a compressed KV cache) keeps its budget in every decoder layer: drop decode "
                           "layers (--decode-layers)")
        with decode_flags():
            keep = check_keep(decode.get("keep"))
            options = eviction_rule(method, keep, options)[1]
        return {"method": method, "layers": None, "keep": keep, "options": options}
    resolved = check_settings(method, decode.get("layers"), decode.get("keep"), options)
    if resolved.get("correct"):
        raise TpcError(f"{method}'s cache correction (option correct) reruns the model densely over generated tokens, "
                       "which a VLM's decode does not do yet: drop option correct")
    return {"method": method, "layers": decode.get("layers"), "keep": decode.get("keep"), "options": options}


def decode_plan(model: nn.Module, stages, settings: dict) -> Plan | dict:
    """The decode plan for ``model``'s language model after the prefill ``stages`` (refused when a stage inside the
    language model leaves its layers caches of different lengths); a compressed KV cache: its ``settings``."""
    inside = [s.layer for s in stages if s.layer >= 0]
    if inside:
        what = ("a compressed KV cache" if kv_eviction(settings["method"]) else "decode-time sparse attention")
        raise TpcError(f"{what} takes one cache length for every decoder layer, and pruning "
                       f"visual tokens after decoder layer {inside[0]} leaves the layers different lengths: prune "
                       "before the language model (no layers: divprune, kcenter, random, topk-cls) with decode")
    if kv_eviction(settings["method"]):
        return settings
    layers = step_spec(model)[0]
    return make_plan(settings["method"], layers, settings["layers"], settings["keep"], settings["options"])


def rewrite(model: nn.Module, plan: Plan, program: torch.export.ExportedProgram | None = None) -> DecodeModule:
    """The language model's decode step (``program``: from ``capture_decode_step``, or captured now), rewritten
    for ``plan`` by the method's decode-time pass."""
    return pipeline.rewrite_decode_step(model, plan, program if program is not None else capture_decode_step(model))


def compress(model: nn.Module, pruned: VlmModule, settings: dict,
             program: torch.export.ExportedProgram | None = None) -> CompressedDecoder:
    """A compressed KV cache for ``pruned``'s decode: its prefill (``pruned.gm``, rewritten here) returns every
    decoder layer's scores for the method's rule, and the language model's decode step (``program``: from
    ``capture_decode_step``, or captured now) does too, run by a ``CompressedDecoder``."""
    score, window, options = scoring(settings["method"], settings["keep"], settings["options"])
    PassManager([PrefillScores(score, window)])(pruned.gm)
    counted = prefill_flops(pruned.gm, pruned.report.prompt_tokens)  # the prefill now scores for the cache too
    pruned.report.flops_after, pruned.report.flops_scoring = counted.total, counted.scoring
    program = program if program is not None else capture_decode_step(model)
    gm = program.module()
    PassManager([EvictionScores(score, window)])(gm)
    return CompressedDecoder(gm, model, settings["method"], settings["keep"], options, program)

