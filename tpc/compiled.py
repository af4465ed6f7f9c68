"""What ``tpc.compile`` returns: the pruned module and the report of what was done."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass
class LayerInfo:
    layer: int
    module: str
    kind: str
    heads: int
    tokens: int  # tokens the layer's attention sees
    kept: int | None = None  # tokens after the layer's pruning step, when it prunes
    method: str | None = None  # the method of that step


@dataclass
class CompileReport:
    model: str
    method: str | None
    layers: list[int]
    keep: list
    prefix: int
    prefix_source: str
    insert_after: str
    options: dict = field(default_factory=dict)
    sites: list[LayerInfo] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0
    flops_scoring: int = 0
    pruned_outputs: list[int] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def schedule(self) -> str:
        """``topk-cls after layers 3,6, keep 0.7,0.5``, or per step for a mixed recipe: ``tome@0 r=8, topk-cls@4 keep 0.6``."""
        if not self.layers:
            return "unpruned"
        methods = [next((s.method for s in self.sites if s.layer == layer and s.method), self.method) for layer in self.layers]
        if len(set(methods)) == 1:
            return f"{methods[0]} after layers {','.join(map(str, self.layers))}, keep {','.join(self.keep)}"
        return ", ".join(f"{m}@{layer} {k if k.startswith('r=') else 'keep ' + k}"
                         for m, layer, k in zip(methods, self.layers, self.keep))

    def table(self) -> str:
        """The per-layer table `tpc inspect` prints."""
        rows = [f"{'layer':>5}  {'module':<28} {'attention':<9} {'heads':>5} {'tokens':>6}  pruning"]
        for s in self.sites:
            prune = f"{s.method or self.method}: {s.tokens} -> {s.kept}" if s.kept is not None else ""
            rows.append(f"{s.layer:>5}  {s.module[:28]:<28} {s.kind:<9} {s.heads:>5} {s.tokens:>6}  {prune}")
        return "\n".join(rows)

    def summary(self) -> str:
        g = 1e9
        lines = [
            f"prefix tokens: {self.prefix} ({self.prefix_source})",
            f"FLOPs at batch 1 (multiply-adds): {self.flops_before / g:.3f} G -> {self.flops_after / g:.3f} G "
            f"({self.flops_ratio:.3f}x, {100 * (1 - self.flops_ratio):.1f}% fewer; scoring {self.flops_scoring / g:.4f} G)",
        ]
        if self.pruned_outputs:
            lines.append(f"note: output(s) {self.pruned_outputs} carry the token axis and hold the kept tokens only "
                         "(restore=True / --restore brings every position back)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class TpcModule(nn.Module):
    """A pruned model: the rewritten aten graph, callable like the original module.

    It is an inference module: forward runs without autograd (the tpc:: ops define no
    gradients), in the eval-mode behaviour the graph was captured with.
    """

    def __init__(self, graph_module: fx.GraphModule, report: CompileReport, example_inputs: tuple):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_inputs = example_inputs

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)
