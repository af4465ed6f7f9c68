"""What a VLM compile did, for ``tpc compile`` / ``tpc inspect``: the vision tower, the visual
span, and the tokens every decoder layer sees for the example prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpc.decode.compressed import CompressedReport
from tpc.vlm.family import spec_of


@dataclass
class VlmReport:
    model: str
    tower: str
    vision_layers: int
    tower_in_graph: bool
    image_token_id: int
    prompt_tokens: int  # the example prompt's length (any length runs)
    visual_span: tuple[int, int]  # first and last visual position in the first example
    visual: int  # visual tokens per example
    layer_tokens: list[int]  # tokens each decoder layer runs on, for the example prompt
    method: str | None = None
    layers: list[int] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    stages: list = field(default_factory=list)
    flops_before: int = 0  # prefill MACs at batch 1 for the example prompt, unpruned (0: not counted)
    flops_after: int = 0  # the same on the rewritten prefill (scoring included)
    flops_scoring: int = 0  # of flops_after, the pruning's own (scoring, selection, gathers)
    vision_scoring: object = None  # topk-cls: a VisionScoring (the vision layers and rule it scores with)
    decode: object = None  # a DecodeReport (the decode steps' sparse attention, tpc/vlm/decode.py) or a
    # CompressedReport (a compressed KV cache); None: dense

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def sites(self) -> list[int]:
        """The language model's decoder layers (what ``tpc inspect`` counts)."""
        return list(range(len(self.layer_tokens)))

    def table(self) -> str:
        eager = "" if self.tower_in_graph else ", run eagerly: not in the captured graph"
        rows = [f"vision tower: {self.tower} ({self.vision_layers} layers{eager}); image token id {self.image_token_id}",
                f"visual tokens: {self.visual} per example, positions {self.visual_span[0]}-{self.visual_span[1]} "
                f"of the {self.prompt_tokens}-token example prompt",
                f"{'layer':>5}  {'tokens':>6}  pruning"]
        for stage in self.stages:
            if stage.layer < 0:
                cls = f" ({self.vision_scoring.describe()})" if self.vision_scoring is not None else ""
                rows.append(f"{'LM in':>5}  {self.prompt_tokens:>6}  {stage.method}: visual {stage.tokens_in} -> "
                            f"{stage.tokens_out} before the language model{cls}")
        for i, tokens in enumerate(self.layer_tokens):
            prune = next((f"{s.method}: visual {s.tokens_in} -> {s.tokens_out}" for s in self.stages
                          if s.layer == i), "")
            rows.append(f"{i:>5}  {tokens:>6}  {prune}")
        if isinstance(self.decode, CompressedReport):
            rows.append(f"decode: {self.decode.summary()}")
        elif self.decode is not None:
            rows += ["decode step:", self.decode.table(self.layer_tokens[-1])]
        return "\n".join(rows)

    def summary(self) -> str:
        full = self.prompt_tokens * len(self.layer_tokens)
        ratio = sum(self.layer_tokens) / full if full else 1.0
        lines = [f"decoder-layer tokens: {sum(self.layer_tokens)} of {full} ({ratio:.3f}x) for the example prompt; "
                 "KV cache after prefill: " + ", ".join(map(str, self.layer_tokens)) + " tokens per layer"
                 + (" before eviction" if isinstance(self.decode, CompressedReport) else "")]
        if self.flops_before:
            g = 1e9
            eager = "" if self.tower_in_graph else ", the eager vision encoder not counted"
            lines.append(f"prefill FLOPs at batch 1 (multiply-adds, {self.prompt_tokens}-token prompt{eager}): "
                         f"{self.flops_before / g:.4g} G -> {self.flops_after / g:.4g} G ({self.flops_ratio:.3f}x, "
                         f"{100 * (1 - self.flops_ratio):.1f}% fewer; scoring {self.flops_scoring / g:.2g} G)")
        if isinstance(self.decode, CompressedReport):
            lines.append(f"decode: {self.decode.summary()}")
        elif self.decode is not None:  # at the example's cache: what its first decode step reads
            lines.append(self.decode.summary(self.layer_tokens[-1]))
        return "\n".join(lines)


def layer_tokens(prompt: int, layers: int, stages) -> list[int]:
    out, tokens = [], prompt
    for i in range(layers):
        for stage in stages:
            if stage.layer + 1 == i:  # the layer after the cut is the first to run on fewer tokens
                tokens -= stage.tokens_in - stage.tokens_out
        out.append(tokens)
    return out


def describe(model, inputs, stages=(), method: str | None = None, flops: tuple[int, int, int] = (0, 0, 0)) -> VlmReport:
    """The report for ``model`` on ``inputs`` (processor outputs) under ``stages`` (none: unpruned);
    ``flops``: (unpruned, pruned, scoring) prefill MACs, when counted."""
    spec = spec_of(model)
    ids = inputs["input_ids"]
    first = torch.nonzero(ids[0] == spec.image_token_id)[:, 0]
    span = (int(first[0]), int(first[-1])) if len(first) else (-1, -1)
    return VlmReport(type(model).__name__, spec.vision_tower, spec.vision_layers, spec.tower_in_graph,
                     spec.image_token_id, ids.shape[1],
                     span, len(first), layer_tokens(ids.shape[1], spec.num_layers, stages), method,
                     [s.layer for s in stages], [str(s.tokens_out) for s in stages], list(stages), *flops)
