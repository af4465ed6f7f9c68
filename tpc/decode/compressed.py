"""``CompressedDecoder``: a causal LM that generates with a KV cache of ``keep`` positions per layer.

One captured program runs both phases (``capture_step(model, chunk=True)``, rewritten by
``EvictionScores`` to return each layer's scores): the prefill is the step over T = prompt tokens
and a one-position, fully masked cache; each decode step is the step over T = 1 and the kept
positions, with the mask of their padding. After each, every layer's cache appends the new keys
and values and evicts by its rule (``tpc/decode/kv_cache.py``), so between steps the cache holds
the budget, not the context.

A VLM's decode (``tpc/vlm/decode.py``) runs the same class over its language model's decode step:
its pruned prefill returns the keys, values and scores (``take``), and ``step`` is given the
rotary position of each new token (the VLM's, which continue from the unpruned prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpc.decode.capture import MAX_CACHE, capture_step, decoder_spec, step_spec
from tpc.decode.kv_cache import compressed_cache
from tpc.decode.kv_methods import budget_for, check_keep, eviction_rule
from tpc.decode.module import checked_generation
from tpc.decode.scores import EvictionScores
from tpc.errors import TpcError
from tpc.generation import decode_tokens
from tpc.passes import PassManager


@dataclass
class CompressedReport:
    model: str
    method: str | None  # None: the dense cache
    keep: int | float
    options: dict
    layers: int

    def summary(self) -> str:
        if self.method is None:
            return f"{self.model}, dense KV cache (every position in each of the {self.layers} layers)"
        keep = f"{self.keep} positions" if isinstance(self.keep, int) else f"{self.keep:g} of the prompt"
        options = ", ".join(f"{k} {'half the budget' if v is None else v}" for k, v in self.options.items())
        return (f"{self.model}, KV cache compressed by {self.method} ({options or 'no options'}): budget {keep} "
                f"in each of the {self.layers} layers")


class CompressedDecoder(nn.Module):
    """A causal LM whose ``generate`` keeps ``keep`` cached positions per layer, evicted by ``method``
    (``None``: none evicted, the dense cache); ``prefill`` and ``step`` expose the cache between steps.
    ``model`` may be a VLM, whose language model ``gm`` steps (its prefill is the VLM's: ``take``)."""

    def __init__(self, gm, model: nn.Module, method: str, keep, options: dict, program=None):
        super().__init__()
        self.gm, self.method, self.keep, self.options = gm, method, keep, options
        self._model = [model]  # not a submodule: its parameters are shared, never registered twice
        self._program = program
        self._shortest_mask = shortest_mask(program) if program is not None else 1
        layers = step_spec(model)[0]
        self.report = CompressedReport(type(model).__name__, method, keep, options, layers)
        self.generation_config = model.generation_config

    def new_cache(self, attention_mask: torch.Tensor):
        """An empty compressed cache for prompts with this (left-padded) mask."""
        budget = budget_for(self.keep, attention_mask.shape[1])
        if self.method is not None:
            eviction_rule(self.method, budget, self.options)  # a ratio's budget checked against the windows
        config = self._model[0].config
        return compressed_cache(config.get_text_config(decoder=True), self.method, budget, self.options, attention_mask)

    def dense(self) -> CompressedDecoder:
        """The same captured step over a cache that keeps every position (what ``tpc bench`` compares with)."""
        return CompressedDecoder(self._program.module(), self._model[0], None, MAX_CACHE, {}, self._program)

    def prefill(self, input_ids, attention_mask=None):
        """(last logits [B, vocab], the compressed cache after the prompt)."""
        self._refuse_vlm()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.new_cache(attention_mask)
        layers, heads, width = decoder_spec(self._model[0])
        dtype = next(self._model[0].parameters()).dtype
        batch = input_ids.shape[0]
        nothing = [input_ids.new_zeros(batch, heads, 1, width, dtype=dtype)] * (2 * layers)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        mask = torch.cat([attention_mask.new_zeros(batch, 1), attention_mask], 1).long()
        return self._feed(cache, self._run(input_ids, positions, mask, nothing), skip=1), cache

    def take(self, logits, past: list[torch.Tensor], scores: list[torch.Tensor], attention_mask):
        """(``logits``, a compressed cache after a prefill run elsewhere): ``past`` its keys and values per layer
        (k_0, v_0, k_1, …) over ``attention_mask``'s [B, S] positions (left padding), ``scores`` each layer's
        scores over them (none for a rule without scores); the cache keeps its budget of them."""
        cache = self.new_cache(attention_mask)
        return self._feed(cache, (logits, *past, *scores), skip=0), cache

    def step(self, cache, tokens, position=None) -> torch.Tensor:
        """Logits [B, vocab] of ``tokens`` [B, 1] after the cache; the cache appends them and evicts.
        ``position`` [B, 1]: the tokens' rotary position (default: the sequence index less the padding)."""
        first = cache.layers[0]
        past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        mask = torch.cat([first.positions[:, 0] >= 0, torch.ones_like(tokens, dtype=torch.bool)], 1).long()
        if position is None:
            position = (first.length - first.start)[:, None]
        return self._feed(cache, self._run(tokens, position, mask, past), skip=0)

    def _refuse_vlm(self) -> None:
        model = self._model[0]
        if getattr(model.config, "vision_config", None) is not None:
            raise TpcError(f"this is the compressed KV cache of {type(model).__name__}'s language model: its prompts "
                           "go through the VLM's pruned prefill; call generate() of the VlmModule it belongs to")

    def _run(self, ids, positions, mask, past):
        """The captured step; a mask shorter than the step takes (a prompt of 1-2 tokens, a budget of 1-2
        positions) gets masked cache positions in front, whose scores are dropped again."""
        pad = max(0, self._shortest_mask - mask.shape[1])
        if pad:
            past = [torch.cat([t.new_zeros(*t.shape[:2], pad, t.shape[3]), t], 2) for t in past]
            mask = torch.cat([mask.new_zeros(mask.shape[0], pad), mask], 1)
        with torch.no_grad():
            out = self.gm(ids, positions, mask, past)
        kv = 1 + len(past)
        return (*out[:kv], *(scores[..., pad:] for scores in out[kv:]))

    def _feed(self, cache, out, skip: int) -> torch.Tensor:
        layers = len(cache.layers)
        scores = out[1 + 2 * layers:]
        for i, layer in enumerate(cache.layers):
            layer.scores = scores[i][..., skip:] if scores else None
            layer.update(out[1 + 2 * i], out[2 + 2 * i])
        return out[0].float()

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.prefill(input_ids, attention_mask)[0]

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, **generation_kwargs) -> torch.Tensor:
        """Prompt and new tokens, [B, S + new], as ``model.generate(**tokenizer_outputs)`` returns them."""
        self._refuse_vlm()
        config, attention_mask, _ = checked_generation(self._model[0], self.generation_config, input_ids,
                                                       attention_mask, max_new_tokens, do_sample, generation_kwargs)
        logits, cache = self.prefill(input_ids, attention_mask)
        return decode_tokens(input_ids, logits, config, lambda tokens: self.step(cache, tokens))


def shortest_mask(program: torch.export.ExportedProgram) -> int:
    """The fewest attention-mask positions the captured step takes: torch.export may raise the lower
    bound of that dynamic size above 1 (4 for the stock Llama), which a short prompt or budget is under."""
    mask = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
    size = mask.meta["val"].shape[1]
    if not isinstance(size, torch.SymInt):
        return size
    expr = size.node.expr  # a symbol (the chunked step's), or the one-token step's cache + 1
    return int(expr.subs({s: program.range_constraints[s].lower for s in expr.free_symbols}))


def compile_compressed(model: nn.Module, *, method: str, keep=None, options=None, program=None) -> CompressedDecoder:
    """``model`` generating with a KV cache of ``keep`` positions per layer, evicted by ``method``.
    ``program``: a chunked step captured before (``capture_step(model, chunk=True)``), reused."""
    keep = check_keep(keep)
    eviction_rule(method, keep, options)  # refuse before capturing
    decoder_spec(model)
    program = program if program is not None else capture_step(model, chunk=True)
    score, window, options = scoring(method, keep, options)
    gm = program.module()
    PassManager([EvictionScores(score, window)])(gm)
    return CompressedDecoder(gm, model, method, keep, options, program)


def scoring(method: str, keep, options) -> tuple[str | None, int, dict]:
    """(the tpc:: score op ``method``'s rule ranks by, None: none; the queries it scores over; the resolved options)."""
    rule, options = eviction_rule(method, keep, options)
    return rule.score, rule(budget_for(check_keep(keep), 1), options).window, options
