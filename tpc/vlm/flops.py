"""Prefill FLOPs of a VLM, counted on the captured graphs with tpc's FLOP counter.

Counted as for encoders (:mod:`tpc.flops`: multiply-adds of linear, matmul, convolution and
attention nodes, plus the ``tpc::`` scorers that compute) at batch 1 and a given prompt
length: the unpruned count on the captured prefill before the rewrite, the pruned count on
the rewritten graph, whose shapes after each pruning point are S − V + K. The vision tower
and projector are in LLaVA's and SmolVLM's graphs and so in both counts; Qwen2-VL's eager
vision encoder is in neither (it is not in the graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from tpc.flops import FlopCount, count_flops
from tpc.graph.nodes import val
from tpc.vlm.graph import prompt_mask

if TYPE_CHECKING:
    from tpc.vlm.module import VlmModule


def prefill_flops(gm: fx.GraphModule, prompt_tokens: int) -> FlopCount:
    """MACs of a captured (or rewritten) prefill for one prompt of ``prompt_tokens`` tokens."""
    length = val(prompt_mask(gm)).shape[1]
    return count_flops(gm, {} if isinstance(length, int) else {length.node.expr: prompt_tokens})


def prefill_gflops(module: VlmModule) -> tuple[float, float]:
    """(unpruned, pruned) prefill GFLOPs (multiply-adds, batch 1) of a compiled VLM for its
    example prompt, as its report states them; the pruned count includes the scoring ops."""
    report = module.report
    return report.flops_before / 1e9, report.flops_after / 1e9
