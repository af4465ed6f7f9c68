"""A KV cache that really shrinks: per layer, only the kept positions, behind transformers' Cache API.

Each layer stores keys and values [B, Hkv, P, d] of the P positions it keeps (P at most the
budget), the sequence index of each kept slot (``positions``, -1 for padding; the keys carry the
rotary position they were computed at, index minus the example's left padding), and the logical
length L: every position seen so far, kept or not. ``get_seq_length`` is L, so ``generate()``
positions the n-th new token at prompt length + n; ``get_mask_sizes`` maps the P slots onto the
sequence indices L - P … L - 1 of the 2-D attention mask.

That mapping is exact because the slots are right-aligned: an example that keeps k < P positions
(its prompt shorter than the budget) has P - k padding slots first, and those are the columns the
attention mask pads: after the prompt P = max over examples of min(budget, real length), so an
example with k = its real length < P sees exactly P - k padding columns among the last P, and
one with k = budget = P sees none. Each new token keeps it so (one more real position everywhere).

Eviction (``Eviction`` rules, ``tpc/decode/eviction.py``) runs after the layer has attended: the
forward reads every kept position and the new ones, then the store keeps the budget best.
"""

from __future__ import annotations

import torch

from tpc.decode.eviction import Eviction, KeepAll
from tpc.decode.kv_methods import eviction_rule
from tpc.errors import TpcError


class CompressedLayer:
    """Mixed into transformers' ``DynamicLayer`` by :func:`compressed_layer` (transformers is optional)."""

    def setup(self, rule: Eviction, start: torch.Tensor | None, method: str) -> None:
        self.rule, self.start, self.method = rule, start, method
        self.positions, self.length, self.scores = None, 0, None

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new keys and values, return everything this forward attends to, then evict."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads = key_states.shape[:2]
            self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=key_states.device)
            if self.start is None:
                self.start = torch.zeros(batch, dtype=torch.long, device=key_states.device)
        prefill, new = self.length == 0, key_states.shape[2]
        index = torch.arange(self.length, self.length + new, device=key_states.device)
        index = index.expand(*key_states.shape[:2], new).masked_fill(index < self.start[:, None, None], -1)
        keys, values = torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)
        self.keys, self.values, self.positions = keys, values, torch.cat([self.positions, index], 2)
        self.length += new
        if self.rule.score is not None and self.scores is None:
            raise TpcError(f"{self.method} ranks cached positions by attention that tpc's compiled step computes: "
                           f"decode with tpc.compile(model, method='{self.method}', keep=…).generate(…) "
                           "(the stock generate() takes this cache for streaming only)")
        self.rule.observe(self.scores, new)
        self.scores = None
        if self.rule.evicts(prefill):
            self.compress()
        return keys, values

    def compress(self) -> None:
        """Keep, per example and KV head, the ``budget`` slots the rule ranks first (padding last), right-aligned."""
        real = self.positions >= 0
        target = int(real[:, 0].sum(-1).clamp(max=self.rule.budget).max())
        if target == self.positions.shape[2]:
            return
        priority = self.rule.priority(self.positions, self.start, self.length).masked_fill(~real, -torch.inf)
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :target]
        index = torch.sort(order, dim=-1).values
        rows = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = torch.gather(self.keys, 2, rows), torch.gather(self.values, 2, rows)
        self.positions = torch.gather(self.positions, 2, index)
        self.rule.take(index)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if self.positions is None else self.positions.shape[2]
        return kept + query_length, self.length - kept

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise TpcError("a compressed KV cache cannot be cropped (it no longer holds the positions to go back to): "
                       "assisted or speculative decoding is not supported with it")


def compressed_cache(config, method: str | None, budget: int, options: dict | None = None, attention_mask=None):
    """A transformers ``Cache`` whose layers keep ``budget`` positions each by ``method``'s rule
    (``None``: every position, the dense cache in the same store).

    ``attention_mask`` [B, S]: the prompt's (left padding), so padding is never kept as a sink or
    counted as a kept position; ``model.generate(**batch, cache=cache)`` uses it as it is (for
    rules without scores: ``streaming``)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class CompressedDynamicLayer(CompressedLayer, DynamicLayer):
        pass

    rule, options = eviction_rule(method, budget, options) if method is not None else (KeepAll, {})
    layers = config.num_hidden_layers
    start = None if attention_mask is None else attention_mask.shape[1] - attention_mask.long().sum(1)
    cache_layers = []
    for _ in range(layers):
        layer = CompressedDynamicLayer()
        layer.setup(rule(budget, options), start, method)
        cache_layers.append(layer)
    return Cache(layers=cache_layers)


def kv_bytes(cache) -> int:
    """Bytes the cache's keys and values hold (physical), every layer."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def state_bytes(cache) -> int:
    """Bytes of the methods' own state (accumulated scores, score history, positions)."""
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer.rule, name) for name in layer.rule.state()] + [layer.positions]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total
