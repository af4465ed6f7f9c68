"""Which cached positions a compressed KV cache keeps: one rule per method, per layer.

A rule ranks a layer's slots ([B, Hkv, N]: the kept positions and the new ones) by a priority,
higher kept; the cache (``tpc/decode/kv_cache.py``) keeps the ``budget`` best of each example and
KV head. Ties go to the older position. The scores come from the captured step
(``tpc/decode/scores.py``): ``attention_mass`` or ``below_mean_counts`` of each layer's own q and k.

- ``streaming`` (StreamingLLM, Xiao et al., ICLR 2024, arXiv 2309.17453, §3.2): the first
  ``sinks`` positions of each example and the most recent ones. No score.
- ``h2o`` (H2O, Zhang et al., NeurIPS 2023, arXiv 2306.14048, Alg. 1): the attention each
  position has received from every query so far (prompt and generated), summed; the ``recent``
  newest positions always kept (default half the budget, the paper's equal split).
- ``snapkv`` (SnapKV, Li et al., 2024, arXiv 2404.14469, §4.2): at the end of the prefill the
  last ``window`` prompt queries vote (attention summed over them), the votes of the prefix are
  pooled along the positions (``avg_pool1d``, ``kernel``, as the paper's code) and the window is
  kept; decoding appends without evicting.
- ``scissorhands`` (Liu et al., NeurIPS 2023, arXiv 2305.17118, Alg. 2): over the last
  ``history`` queries, how often a position got less than the mean attention (unimportant);
  the most often unimportant are dropped, the ``recent`` newest always kept.

Every rule is per KV head (the G query heads of a group vote together); a sink or recent
window is per example.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from tpc.errors import TpcError

INF = float("inf")


class Eviction(abc.ABC):
    """One layer's rule. ``score``: the tpc:: op the step computes for it (None: none) over the last
    ``window`` queries; ``state`` tensors have the slots as their last dim and follow the kept slots."""

    score: str | None = None
    window: int = 1
    reserved: str | None = None  # the option naming positions the rule always keeps
    needs_more = 0  # positions the budget must hold beyond those

    def __init__(self, budget: int, options: dict):
        self.budget, self.options = budget, options

    @classmethod
    def check(cls, method: str, budget: int, options: dict) -> None:
        """One line for a budget the rule's fixed windows do not fit in."""
        size = options.get(cls.reserved) if cls.reserved else None
        if size is not None and budget < size + cls.needs_more:
            more = " plus a recent window of 1" if cls.needs_more else ""
            raise TpcError(f"keep {budget} is smaller than {method}'s {cls.reserved} of {size}{more}: give a budget "
                           f"of at least {size + cls.needs_more} positions or a smaller {cls.reserved} "
                           f"(--option {cls.reserved}=…)")

    def observe(self, scores: torch.Tensor | None, new: int) -> None:
        """Fold one forward's scores (over the old slots and the ``new`` ones) into the state."""

    def evicts(self, prefill: bool) -> bool:
        return True

    @abc.abstractmethod
    def priority(self, positions: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
        """[B, Hkv, N] per slot: the ``budget`` highest are kept (``positions`` the slots' sequence
        indices, ``start`` each example's first real position, ``length`` the logical length)."""

    def state(self) -> list[str]:
        return []

    def take(self, index: torch.Tensor) -> None:
        for name in self.state():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, torch.gather(t, -1, index.view(*index.shape[:2], *[1] * (t.dim() - 3),
                                                                    index.shape[-1]).expand(*t.shape[:-1], -1)))


class KeepAll(Eviction):
    """The dense cache through the same store (what ``tpc bench`` compares with): nothing evicted."""

    def evicts(self, prefill):
        return False

    def priority(self, positions, start, length):
        return positions.float()  # never asked (nothing is evicted); recency if it were


def recent(positions: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """[B, Hkv, N] bool: the ``count`` newest positions (left padding: the newest are real)."""
    return positions >= length - count


def _grow(t: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """``t`` with zero columns for the new slots, to align with ``scores``."""
    if t is None:
        return torch.zeros_like(scores)
    return F.pad(t, (0, scores.shape[-1] - t.shape[-1]))


class Streaming(Eviction):
    reserved, needs_more = "sinks", 1

    def priority(self, positions, start, length):
        sinks = positions < start[:, None, None] + self.options["sinks"]
        return positions.float().masked_fill(sinks, INF)


class H2O(Eviction):
    score, window = "attention_mass", 1 << 30  # every query: the prompt's and each generated one
    reserved = "recent"

    def __init__(self, budget, options):
        super().__init__(budget, options)
        self.recent = options["recent"] if options["recent"] is not None else budget // 2
        self.accumulated = None

    def state(self):
        return ["accumulated"]

    def observe(self, scores, new):
        self.accumulated = _grow(self.accumulated, scores) + scores

    def priority(self, positions, start, length):
        return self.accumulated.masked_fill(recent(positions, length, self.recent), INF)


class SnapKV(Eviction):
    score, reserved = "attention_mass", "window"

    def __init__(self, budget, options):
        super().__init__(budget, options)
        self.window, self.votes = options["window"], None

    def evicts(self, prefill):
        return prefill

    def observe(self, scores, new):
        self.votes = scores

    def priority(self, positions, start, length):
        inside = recent(positions, length, self.window)
        votes = self.votes.masked_fill(inside, 0.0)  # the window votes for the prefix only
        b, h, n = votes.shape
        kernel = self.options["kernel"]
        pooled = F.avg_pool1d(votes.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2).reshape(b, h, n)
        return pooled.masked_fill(inside, INF)


class Scissorhands(Eviction):
    score, reserved = "below_mean_counts", "recent"

    def __init__(self, budget, options):
        super().__init__(budget, options)
        self.window, self.recent, self.history = options["history"], options["recent"], None

    def state(self):
        return ["history"]

    def observe(self, scores, new):
        rows = scores if self.history is None else torch.cat([_grow(self.history, scores), scores], 2)
        self.history = rows[:, :, -self.window:]

    def priority(self, positions, start, length):
        return (-self.history.sum(2)).masked_fill(recent(positions, length, self.recent), INF)
