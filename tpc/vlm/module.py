"""The pruned VLM: a captured, rewritten prefill and a decoder that reuses its KV cache.

``prefill`` runs the rewritten graph: logits of the kept prompt tokens and every layer's
keys and values, the layers after a pruning point holding only the kept tokens. ``generate``
then decodes with the model's own (stock, unpatched) decoder layers over that cache: each
new token's position continues from the unpruned prompt (``generate()``'s positions: the
count of real tokens), and each layer's attention mask covers exactly the keys its cache
holds, so every rotary distance is the unpruned model's. With a decoder attached
(``tpc/vlm/decode.py``) the new tokens run the language model's captured step instead: sparse
attention over the pruned cache, or a compressed KV cache that the prefill's scores and each
step's evict down to its budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from tpc.decode.compressed import CompressedDecoder
from tpc.decode.kv_methods import kv_eviction
from tpc.decode.module import KVBuffer
from tpc.decode.side import side_state
from tpc.errors import TpcError
from tpc.exports.atomic import check_output_path, kept_on_failure
from tpc.generation import checked_mask, decode_tokens, generation_config, new_tokens, refuse_right_padding
from tpc.recipe import Step
from tpc.vlm.export import save_prefill
from tpc.vlm.family import Family, language_model
from tpc.vlm.inputs import layer_valid

if TYPE_CHECKING:  # transformers is an optional dependency: `import tpc` must work without it
    from transformers import DynamicCache


@contextmanager
def decode_flags():
    """A decoder LM's refusal as a VLM's CLI spells its flags (``--option`` is ``--decode-option`` there)."""
    try:
        yield
    except TpcError as err:
        raise TpcError(str(err).replace("--option ", "--decode-option ")) from None


@dataclass
class Prefill:
    logits: torch.Tensor  # [B, S', vocab]: the last decoder layer's kept tokens
    cache: DynamicCache  # per layer, the keys/values of the tokens that layer saw
    valid: list[torch.Tensor]  # per layer, [B, len] bool: which cached keys are real (not padding)
    kept: list[torch.Tensor]  # per pruning stage, [B, S'] original positions of the tokens kept
    positions: torch.Tensor  # prompt positions: [B, S], or [3, B, S] (Qwen2-VL's M-RoPE)
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer, a compressed cache's scores (none: dense)


class VlmModule(nn.Module):
    """A VLM whose prefill prunes visual tokens; ``generate`` as the Hugging Face model's."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, family: Family, stages: list[Step], report,
                 example_inputs: tuple, program: torch.export.ExportedProgram | None = None):
        """``stages`` empty: the captured prefill unpruned (the baseline ``unpruned()`` returns);
        ``program``: that capture, kept so the baseline needs no second export."""
        super().__init__()
        self.gm = gm
        self.family, self.spec = family, family.spec()
        self.stages, self.report, self.example_inputs = stages, report, example_inputs
        self.visual = report.visual  # visual tokens per example the prefill was compiled for
        self._model = [model]  # not a submodule: its parameters are shared, never registered twice
        self._program = program
        self.generation_config = model.generation_config
        self.decoder = None  # the language model's decode step, rewritten (tpc/vlm/decode.py): a DecodeModule
        # (sparse attention) or a CompressedDecoder (a compressed KV cache)

    def attach_decoder(self, decoder) -> None:
        """Decode through ``decoder`` (a ``DecodeModule`` or ``CompressedDecoder`` of this VLM's language model)
        instead of the stock layers."""
        self.decoder = decoder
        self.report.decode = decoder.report

    def prefill(self, input_ids, pixel_values=None, attention_mask=None, **image_inputs) -> Prefill:
        """Run the pruned prefill on processor outputs (``image_inputs``: the family's others,
        such as Qwen2-VL's ``image_grid_thw``)."""
        if pixel_values is None:
            raise TpcError("prefill() runs the pruned image prompt and needs the processor's pixel_values; a "
                           "text-only prompt has no visual tokens to prune: run it with generate() or the model itself")
        unknown = sorted(set(image_inputs) - set(self.family.INPUTS))
        if unknown:
            raise TpcError(f"{type(self._model[0]).__name__} takes no input {unknown[0]!r}: it reads input_ids, "
                           f"pixel_values, attention_mask{''.join(', ' + n for n in self.family.INPUTS)}")
        attention_mask = checked_mask(input_ids, attention_mask)
        args, visual = self.family.graph_args({"input_ids": input_ids, "pixel_values": pixel_values,
                                               "attention_mask": attention_mask, **image_inputs})
        if visual != self.visual:
            raise TpcError(f"each prompt holds {visual} image tokens; this module was compiled for "
                           f"{self.visual} (its example inputs' number of images): compile it again "
                           "with that many images per prompt")
        self._refuse_short_text(input_ids, attention_mask)
        args = _as_captured(self.gm, args)
        with torch.no_grad():
            out = self.gm(*args)
        from transformers import DynamicCache  # noqa: F811  (an optional dependency: imported when a VLM runs)

        n = self.spec.num_layers
        end = 1 + 2 * n + len(self.stages)  # then the scores of a compressed cache (tpc/vlm/scores.py)
        logits, kv, kept, scores = out[0], out[1:1 + 2 * n], list(out[1 + 2 * n:end]), list(out[end:])
        cache = DynamicCache()
        for i in range(n):
            cache.update(kv[2 * i], kv[2 * i + 1], i)
        return Prefill(logits, cache, layer_valid(attention_mask, self.stages, kept, n), kept, args[3], scores)

    @property
    def fewest_text_tokens(self) -> int:
        """Text tokens a prompt needs besides its visual ones: a stage keeping no visual token leaves
        the text alone, and torch.export takes a symbolic length of 2 or more (0 and 1 are specialized)."""
        return 2 if any(s.tokens_out == 0 for s in self.stages) else 0

    def _refuse_short_text(self, input_ids, attention_mask) -> None:
        need = self.fewest_text_tokens
        if not need:
            return
        drop = next(s for s in self.stages if s.tokens_out == 0).layer
        why = f"keep 0 drops every visual token after decoder layer {drop}, leaving the text alone"
        if input_ids.shape[1] - self.visual < need:
            raise TpcError(f"{why}: a prompt needs {need} tokens besides its {self.visual} image tokens (BOS and one "
                           f"more), got {input_ids.shape[1] - self.visual}")
        text = ((input_ids != self.spec.image_token_id) & attention_mask.bool()).sum(1)
        if not bool(text.all()):
            raise TpcError(f"{why}: example {int(torch.nonzero(text == 0)[0, 0])} of the batch holds no real text "
                           "token (its others are padding); give it its prompt's text")

    def unpruned(self) -> VlmModule:
        """The same captured prefill without the rewrite (every token in every layer, the full KV
        cache): what ``tpc bench`` times this module against."""
        if self._program is None:
            raise TpcError("this VlmModule keeps no captured program to take the unpruned prefill from")
        flops = self.report.flops_before
        report = replace(self.report, method=None, layers=[], keep=[], stages=[], flops_after=flops, decode=None,
                         flops_scoring=0, vision_scoring=None,
                         layer_tokens=[self.report.prompt_tokens] * len(self.report.layer_tokens))
        gm = self._program.module()
        return VlmModule(gm, self._model[0], self.family, [], report, self.example_inputs, self._program)

    def save(self, path, check: bool = True):
        """Write the pruned prefill as a ``.pt2`` program or an ``.onnx`` model (by ``path``'s suffix;
        symbolic batch and prompt length), checked against this module on the example inputs (the
        batch and its first example) before it is renamed into place. Returns the check's result.
        With a sparse decode step, that step is written too, as ``<path stem>.decode.pt2`` beside it (checked
        likewise; a failure leaves at ``path`` what was there before)."""
        if self.decoder is None:
            return save_prefill(self, path, check)
        if isinstance(self.decoder, CompressedDecoder):
            refuse_cache_artifact(self.decoder.method)
        step = step_path(path)
        check_output_path(step)
        with kept_on_failure(path):  # the step failing leaves the file that was at path, not the new prefill
            result = save_prefill(self, path, check)
            self.decoder.save(step, check)
        return result

    def forward(self, input_ids, pixel_values=None, attention_mask=None, **image_inputs) -> torch.Tensor:
        """Logits of the tokens the last decoder layer kept, [B, S', vocab]."""
        return self.prefill(input_ids, pixel_values, attention_mask, **image_inputs).logits

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, **generation_kwargs) -> torch.Tensor:
        """Prompt and new tokens, [B, S + new], as ``model.generate(**processor_outputs)`` returns them.

        A text-only prompt (no image tokens, no ``pixel_values``) has nothing to prune: it runs
        through the stock model's ``generate``, as the Hugging Face model runs it.
        """
        image_inputs = {k: generation_kwargs.pop(k) for k in self.family.INPUTS if k in generation_kwargs}
        config = generation_config(self.generation_config, generation_kwargs, max_new_tokens, do_sample)
        attention_mask = checked_mask(input_ids, attention_mask, config.pad_token_id, config.eos_token_id)
        if pixel_values is None:
            return self._text_only(input_ids, attention_mask, config)
        refuse_right_padding(attention_mask)
        state = self.prefill(input_ids, pixel_values, attention_mask, **image_inputs)
        if isinstance(self.decoder, CompressedDecoder):
            logits, cache = self.compressed_cache(state)
            position = last_position(state.positions)
            del state  # the prefill's whole cache and logits: decoding reads only the compressed cache
            return self._generate_compressed(input_ids, logits, cache, position, config)
        if self.decoder is not None:
            return self._generate_sparse(input_ids, state, config)
        lm, head = language_model(self._model[0])
        position = last_position(state.positions)
        valid = state.valid

        def step(token):
            nonlocal position, valid
            position = position + 1
            valid = [torch.cat([v, torch.ones_like(v[:, :1])], 1) for v in valid]
            return _decode_step(lm, head, token, position, valid, state.cache)

        return decode_tokens(input_ids, state.logits[:, -1].float(), config, step)

    def _generate_sparse(self, input_ids, state: Prefill, config) -> torch.Tensor:
        """Decode through the rewritten step of the language model (``self.decoder``) over a ``KVBuffer`` holding
        the pruned prefill's cache; every layer's cache has the same length (``tpc.vlm.decode.decode_plan``), so
        one mask [B, L + 1] covers them all."""
        decoder = self.decoder
        capacity = state.valid[0].shape[1] + max(new_tokens(config, input_ids.shape[1]), 1)
        kv = KVBuffer(state.cache, capacity)
        position, mask = last_position(state.positions), state.valid[0].long()
        side = None

        def step(token):
            nonlocal position, mask, side
            position = position + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            if decoder.takes_bounds and side is None:  # quest's page bounds, dhsa's chunk summaries
                side = side_state(decoder.plan, kv.views(), mask, capacity)
            out = decoder.step(token, position, mask, kv.views(), side.views() if side is not None else None)
            kv.append(out[1:])
            if side is not None:
                side.append(out[1:])
            return out[0].float()

        return decode_tokens(input_ids, state.logits[:, -1].float(), config, step)

    def compressed_cache(self, state: Prefill):
        """(last logits [B, vocab], the compressed KV cache after the pruned prefill ``state``): every layer's rule
        keeps its budget of the prompt's cached positions, by the scores the prefill returned."""
        if not isinstance(self.decoder, CompressedDecoder):
            raise TpcError("this VlmModule decodes without a compressed KV cache: compile it with decode={'method': "
                           "'h2o', 'keep': 256} (or snapkv, scissorhands, streaming)")
        past = [t for layer in state.cache.layers for t in (layer.keys, layer.values)]
        with decode_flags():  # a ratio's budget, checked against the rule's windows on this prompt
            return self.decoder.take(state.logits[:, -1].float().clone(), past, state.scores, state.valid[0])  # no view

    def _generate_compressed(self, input_ids, logits, cache, position, config) -> torch.Tensor:
        """Decode over the compressed ``cache`` (``self.decoder``, a ``CompressedDecoder``) after the prompt's last
        ``logits`` and ``position``: each new token runs the language model's step over the kept positions at the
        VLM's next position, then the cache evicts."""

        def step(token):
            nonlocal position
            position = position + 1
            return self.decoder.step(cache, token, position)

        return decode_tokens(input_ids, logits, config, step)

    def _text_only(self, input_ids, attention_mask, config) -> torch.Tensor:
        images = int((input_ids == self.spec.image_token_id).sum())
        if images:
            raise TpcError(f"the prompts hold {images} image tokens (id {self.spec.image_token_id}) but no "
                           "pixel_values were given: pass the processor's pixel_values with its input_ids")
        model = self._model[0]
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def step_path(path) -> Path:
    """Where ``save`` writes the sparse decode step of a VLM written at ``path``: ``vlm.pt2`` (or ``vlm.onnx``) ->
    ``vlm.decode.pt2``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.decode.pt2")


def refuse_cache_artifact(method) -> None:
    """A VLM's compressed KV cache lives while it generates: no file holds it (``tpc compile``, ``save``)."""
    if kv_eviction(method):
        raise TpcError(f"decode {method} compresses the KV cache while generating: there is no file to write for it; "
                       f"run tpc.compile(vlm, inputs, method=…, decode={{'method': '{method}', 'keep': 256}})"
                       ".generate(…) in Python, or write the pruned prefill without --decode")


def _as_captured(gm: fx.GraphModule, args: tuple) -> tuple:
    """Floating inputs in the dtype the prefill was captured with (float16 pixels for a float32
    capture): the stock model casts its pixels to the tower's dtype the same way."""
    dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(a.to(d) if d is not None and a.is_floating_point() and d.is_floating_point and a.dtype != d else a
                 for a, d in zip(args, dtypes))


def last_position(positions: torch.Tensor) -> torch.Tensor:
    """[B, 1]: each prompt's largest position; generated tokens continue from it, one by one.

    As ``generate()``: ``cumsum(attention_mask) - 1`` for [B, S] positions; for M-RoPE
    [3, B, S], the text position plus Qwen2-VL's ``rope_deltas``, which is the same number.
    """
    return (positions if positions.dim() == 2 else positions.amax(0)).amax(-1, keepdim=True)


def _decode_step(lm, head, token, position, valid, cache) -> torch.Tensor:
    """One token through the stock decoder layers, each attending to the keys its cache holds."""
    hidden = lm.embed_tokens(token)
    rotary = lm.rotary_emb(hidden, position)
    for i, layer in enumerate(lm.layers):
        hidden = layer(hidden, attention_mask=valid[i][:, None, None, :], position_ids=position, cache=cache,
                       use_cache=True, position_embeddings=rotary)
    return head(lm.norm(hidden))[:, -1].float()
