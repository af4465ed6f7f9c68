"""``DecodeModule``: a decoder language model whose decode step is a captured, rewritten graph.

``generate`` runs as ``model.generate`` does (greedy or sampled, left-padded batches): the
prompt goes through the stock model once (the prefill), then every new token through the
decode-step graph. The KV cache lives in one buffer per layer, [B, Hkv, prompt + new, d],
whose first L positions are handed to the step as views and to which the step's new keys and
values are written in place, so the cache is never copied whole between steps. A quest step
also takes its layers' page bounds, a dhsa step its layers' chunk summaries, kept up to date
beside the KV buffer (``tpc/decode/side.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tpc.decode.capture import step_spec
from tpc.decode.correction import corrected_step
from tpc.decode.export import save_step
from tpc.decode.side import side_inputs, side_state, takes_side
from tpc.decode.plan import Plan, describe_budget, sparse_positions
from tpc.errors import TpcError
from tpc.generation import checked_mask, decode_tokens, generation_config, new_tokens, refuse_right_padding


@dataclass
class DecodeReport:
    model: str
    method: str | None
    layers: int
    selection: list[int] = field(default_factory=list)
    sparse: list[int] = field(default_factory=list)
    keep: int | float | None = None  # positions, or a ratio of the cache
    kv_heads: int = 0
    head_dim: int = 0
    itemsize: int = 4
    page: int | None = None  # quest: positions per page (each sparse layer selects its own pages)
    min_chunk: int | None = None  # dhsa: the shortest chunk (each sparse layer selects its own chunks' positions)
    correct: int = 0  # tidal: generate() rewrites the cache of every `correct` new tokens densely (0: never)

    def positions_read(self, layer: int, cached: int) -> int:
        """Cache positions layer ``layer`` attends to in one step at ``cached`` cached positions (+ the new token)."""
        return (sparse_positions(self.keep, self.page, cached) if layer in self.sparse else cached) + 1

    def kv_bytes(self, cached: int, batch: int = 1) -> int:
        """Bytes of keys and values the attention of all layers reads in one step; a quest layer also reads
        its page bounds (a min and a max key per page: one position's keys and values per page), a dhsa
        layer its ceil(L / min_chunk) chunk slots (a float32 key per KV head and two int64 per slot)."""
        per_position = 2 * self.kv_heads * self.head_dim * self.itemsize * batch
        positions = sum(self.positions_read(i, cached) for i in range(self.layers))
        pages = len(self.sparse) * -(-cached // self.page) if self.page is not None else 0
        chunks = 0
        if self.min_chunk is not None:
            chunks = len(self.sparse) * -(-cached // self.min_chunk) * (self.kv_heads * self.head_dim * 4 + 16) * batch
        return (positions + pages) * per_position + chunks

    def table(self, cached: int = 8192) -> str:
        rows = ["layer  attention         positions read at L=%d" % cached]
        for i in range(self.layers):
            kind = ("sparse (pages)" if self.page else "sparse (chunks)" if self.min_chunk else "sparse") \
                if i in self.sparse else \
                "dense + select" if i in self.selection else "dense"
            rows.append(f"{i:5d}  {kind:16s}  {self.positions_read(i, cached)}")
        return "\n".join(rows)

    def _at(self, cached: int) -> str:
        """For a ratio, what it reads at ``cached`` cached positions (an int budget says it already)."""
        if not isinstance(self.keep, float):
            return ""
        return f" ({sparse_positions(self.keep, self.page, cached)} positions at {cached} cached)"

    def summary(self, cached: int = 8192) -> str:
        if self.method is None:
            what = "dense (every layer reads the whole cache)"
        elif self.min_chunk is not None:
            what = (f"{self.method}: {len(self.sparse)} sparse layers {self.sparse} reading {describe_budget(self.keep)}"
                    f"{self._at(cached)} from their best-scored chunks of keys")
        elif self.page is None:
            what = (f"{self.method}: selection layers {self.selection}, {len(self.sparse)} sparse layers reading "
                    f"{describe_budget(self.keep)}{self._at(cached)}"
                    + (f"; generate() rewrites the cache of every {self.correct} new tokens densely "
                       "(not part of the saved step)" if self.correct else ""))
        else:
            what = (f"{self.method}: {len(self.sparse)} sparse layers {self.sparse} reading "
                    f"{'' if isinstance(self.keep, float) else 'the best '}{describe_budget(self.keep, self.page)}"
                    f"{self._at(cached)}")
        dense = DecodeReport(self.model, None, self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                             itemsize=self.itemsize)
        return (f"{self.model}, decode step, {what}; KV read per step per example at {cached} cached positions: "
                f"{self.kv_bytes(cached) / 2**20:.1f} MiB (dense {dense.kv_bytes(cached) / 2**20:.1f} MiB)")


def describe(model: nn.Module, plan: Plan | None) -> DecodeReport:
    layers, heads, width = step_spec(model)
    itemsize = next(model.parameters()).element_size()
    if plan is None:
        return DecodeReport(type(model).__name__, None, layers, kv_heads=heads, head_dim=width, itemsize=itemsize)
    return DecodeReport(type(model).__name__, plan.method, layers, list(plan.selection), plan.sparse, plan.keep,
                        heads, width, itemsize, plan.page, plan.chunk[0] if plan.chunk else None, plan.correct)


class DecodeModule(nn.Module):
    """A causal LM whose decode step reads the KV cache as its plan says; ``generate`` as HF's."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, report: DecodeReport,
                 program: torch.export.ExportedProgram, plan: Plan | None = None):
        super().__init__()
        self.gm, self.report, self.plan = gm, report, plan
        self._model = [model]  # not a submodule: its parameters are shared, never registered twice
        self._program = program  # the dense capture: unpruned() and the ideal reuse it
        self.generation_config = model.generation_config

    @property
    def takes_bounds(self) -> bool:
        """Whether the step takes quest's page bounds or dhsa's chunk summaries (``tpc/decode/side.py``) as a
        fifth input."""
        return takes_side(self.plan)

    def step(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor], bounds=None) -> tuple:
        """One decode step: (logits [B, vocab], the new token's keys and values per layer). A quest step
        takes its layers' page ``bounds`` too, a dhsa step its layers' chunk summaries, computed here from
        ``past`` when not given."""
        with torch.no_grad():
            if not self.takes_bounds:
                return self.gm(input_ids, position_ids, attention_mask, list(past))
            if bounds is None:
                bounds = side_inputs(self.plan, past, attention_mask)
            return self.gm(input_ids, position_ids, attention_mask, list(past), list(bounds))

    def _refuse_vlm(self) -> None:
        """The decode step of a VLM's language model runs inside that VLM's ``generate`` (its prefill is the VLM's)."""
        model = self._model[0]
        if getattr(model.config, "vision_config", None) is not None:
            raise TpcError(f"this is the decode step of {type(model).__name__}'s language model: its prompts go through "
                           "the VLM's pruned prefill; call generate() of the VlmModule it belongs to")

    def unpruned(self) -> DecodeModule:
        """The same captured decode step, every layer dense (what ``tpc bench`` compares with)."""
        model = self._model[0]
        return DecodeModule(self._program.module(), model, describe(model, None), self._program)

    def save(self, path, check: bool = True):
        """Write the rewritten decode step as a ``.pt2`` program or an ``.onnx`` model (by ``path``'s suffix),
        checked against this module before it is renamed into place."""
        return save_step(self, path, check)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits of the prompt's last token [B, vocab] (the stock model's prefill)."""
        return self.prefill(input_ids, attention_mask)[0]

    def prefill(self, input_ids, attention_mask=None):
        """Run the prompt through the stock model: (last logits [B, vocab], its cache, positions)."""
        self._refuse_vlm()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        with torch.no_grad():
            out = self._model[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=True)
        return out.logits[:, -1].float(), out.cache, positions

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, **generation_kwargs) -> torch.Tensor:
        """Prompt and new tokens, [B, S + new], as ``model.generate(**tokenizer_outputs)`` returns them."""
        self._refuse_vlm()
        config, attention_mask, new = checked_generation(self._model[0], self.generation_config, input_ids,
                                                         attention_mask, max_new_tokens, do_sample, generation_kwargs)
        logits, cache, positions = self.prefill(input_ids, attention_mask)
        capacity = input_ids.shape[1] + max(new, 1)
        kv = KVBuffer(cache, capacity)
        position, mask = positions[:, -1:], attention_mask.long()
        pages, fed = None, []
        correct = self.plan.correct if self.plan is not None else 0

        def step(token):
            nonlocal position, mask, pages
            position = position + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            if correct:  # TidalDecode's cache correction (tpc/decode/correction.py)
                fed.append(token)
                if len(fed) == correct:
                    logits = corrected_step(self._model[0], kv, torch.cat(fed, 1), position, mask)
                    fed.clear()
                    return logits
            if self.takes_bounds and pages is None:
                pages = side_state(self.plan, kv.views(), mask, capacity)
            out = self.step(token, position, mask, kv.views(), pages.views() if pages is not None else None)
            kv.append(out[1:])
            if pages is not None:
                pages.append(out[1:])
            return out[0].float()

        return decode_tokens(input_ids, logits, config, step)


def checked_generation(model: nn.Module, base_config, input_ids, attention_mask, max_new_tokens, do_sample,
                       generation_kwargs: dict):
    """(the generation settings, the checked attention mask, how many tokens to draw) for ``generate``:
    one line for settings, prompts or masks it cannot continue."""
    config = generation_config(base_config, generation_kwargs, max_new_tokens, do_sample)
    attention_mask = checked_mask(input_ids, attention_mask, config.pad_token_id, config.eos_token_id)
    _refuse_outside_vocabulary(input_ids, model.config.vocab_size)
    refuse_right_padding(attention_mask)
    new = new_tokens(config, input_ids.shape[1])
    _refuse_past_window(model, input_ids.shape[1] + new)
    return config, attention_mask, new


def _refuse_outside_vocabulary(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids lie in [0, vocab_size) (``checked_mask`` has refused non-integer ids): anything else
    would fail deep in the embedding."""
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise TpcError(f"input_ids hold token id {low if low < 0 else high}, outside the model's vocabulary "
                       f"(0-{vocab_size - 1}): use the tokenizer that belongs to this model")


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window attention layers (Mistral's ``sliding_window``,
    Qwen2's ``use_sliding_window``), or None when every layer attends to the whole cache."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def _refuse_past_window(model: nn.Module, tokens: int) -> None:
    """Past its window a sliding-window model keeps only the window's positions in its cache,
    which the captured decode step (reading every cached position) does not: one line instead."""
    window = sliding_window(model.config)
    if window is not None and tokens > window:
        raise TpcError(f"{type(model).__name__} attends within a sliding window of {window} tokens, and the decode "
                       f"step covers prompt and new tokens up to that window only ({tokens} asked): shorten the "
                       "prompt or max_new_tokens")


class KVBuffer:
    """Per layer, keys and values in one preallocated [B, Hkv, capacity, d] buffer each."""

    def __init__(self, cache, capacity: int):
        self.buffers, self.length = [], 0
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                buf = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
                buf[:, :, :t.shape[2]] = t
                self.buffers.append(buf)
                self.length = t.shape[2]

    def views(self) -> list[torch.Tensor]:
        return [b[:, :, :self.length] for b in self.buffers]

    def append(self, new: tuple) -> None:
        if self.length >= self.buffers[0].shape[2]:
            raise TpcError("the KV buffer is full: generate() sized it for max_new_tokens")
        self.replace(self.length, new)

    def replace(self, start: int, new) -> None:
        """Write each layer's [B, Hkv, T, d] keys and values (flat, as the step returns them) at positions
        ``start`` … ``start + T - 1``; the buffer then holds ``start + T`` positions."""
        for buf, t in zip(self.buffers, new):
            buf[:, :, start:start + t.shape[2]] = t
        self.length = start + new[0].shape[2]
