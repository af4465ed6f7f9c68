"""What ``tpc.compile`` returns: the pruned module and the report of what was done."""

from __future__ import annotations

import functools

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tpc.capture import is_token_input, length_range, length_span
from tpc.errors import TpcError


@dataclass
class LayerInfo:
    layer: int
    module: str
    kind: str
    heads: int
    tokens: int  # tokens the layer's attention sees
    kept: int | None = None  # tokens after the layer's pruning step, when it prunes
    r_asked: int | None = None  # the r the schedule gave this layer, when pruning by r
    r: int | None = None  # the r applied: r_asked clamped to the method's bound (tome: ToMe's)
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

    def table(self) -> str:
        """The per-layer table `tpc inspect` prints."""
        rows = [f"{'layer':>5}  {'module':<28} {'attention':<9} {'heads':>5} {'tokens':>6}  pruning"]
        for s in self.sites:
            method = s.method or self.method
            prune = f"{method}: {s.tokens} -> {s.kept}" if s.kept is not None else ""
            if s.r is not None and s.r != s.r_asked:
                prune = f"{prune or method + ': nothing merged'} (r {s.r_asked} clamped to {s.r})"
            rows.append(f"{s.layer:>5}  {s.module[:28]:<28} {s.kind:<9} {s.heads:>5} {s.tokens:>6}  {prune}")
        return "\n".join(rows)

    def recipe(self) -> str:
        return recipe(self)

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
        clamped = [s for s in self.sites if s.r is not None and s.r != s.r_asked]
        if clamped:
            lines.append(f"note: r clamped at {len(clamped)} layer(s) to (tokens - prefix) // 2, as ToMe clamps it; "
                         "see the table")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def recipe(report) -> str:
    """One line for any report with method, layers and keep (a VLM's too): the method, its
    budget (equal values shown once) and its layers; a mixed recipe step by step."""
    methods = [next((s.method for s in getattr(report, "sites", [])
                     if getattr(s, "layer", None) == layer and getattr(s, "method", None)),  # a VLM's sites are ints
                    report.method) for layer in report.layers]
    if len(set(methods)) > 1:  # a mixed recipe: one method per step
        return ", ".join(f"{m}@{layer} {k if str(k).startswith('r=') else f'keep {k}'}"
                         for m, layer, k in zip(methods, report.layers, report.keep))
    removals = bool(report.keep) and all(str(k).startswith("r=") for k in report.keep)
    values = [str(k)[2:] for k in report.keep] if removals else [str(k) for k in report.keep]
    budget = values[0] if len(set(values)) == 1 else ",".join(values)
    layers = list(report.layers)
    where = f"after layers {_ranges(layers)}"
    if layers and layers[0] == -1:  # a VLM's stage 1 prunes before the language model's first layer
        where = "before the language model" + (f", after layers {_ranges(layers[1:])}" if layers[1:] else "")
    return f"{report.method} {'r=' if removals else 'keep '}{budget} {where}"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


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
        if kwargs:
            args = self._by_position(args, kwargs)
        self._check_inputs(args)
        self._check_length(args)
        with torch.no_grad():
            return self.graph_module(*args)

    @functools.cached_property
    def _input_specs(self) -> list[tuple[str, list[int | None], torch.dtype]] | None:
        """Per graph input: name, sizes (None: symbolic) and captured dtype; None for nested inputs."""
        placeholders = list(self.graph_module.graph.find_nodes(op="placeholder"))
        wanted = [n.meta.get("val") for n in placeholders]
        if not all(isinstance(w, torch.Tensor) for w in wanted):
            return None
        return [(n.target, [d if isinstance(d, int) else None for d in w.shape], w.dtype) for n, w in zip(placeholders, wanted)]

    def _check_inputs(self, args: tuple) -> None:
        """Inputs of another count, dtype, rank or fixed size refused in one line, naming the input and
        what it takes (the graph's guards say ``Tensor dtype mismatch`` or ``Guard failed: x.size()[2] == 32``)."""
        specs = self._input_specs
        if specs is None or not all(isinstance(x, torch.Tensor) for x in args):
            return  # nested inputs: the graph's own input checks
        if len(args) != len(specs):
            names = ", ".join(name for name, _, _ in specs)
            raise TpcError(f"this pruned model takes {len(specs)} input(s) ({names}), not {len(args)}")
        cast = next((p.dtype for p in self.graph_module.parameters() if p.is_floating_point()), None)  # after .half()
        for (name, dims, captured), x in zip(specs, args):
            dtype = cast if cast is not None and captured.is_floating_point else captured
            if x.dtype == dtype and x.dim() == len(dims) and all(d in (None, n) for d, n in zip(dims, x.shape)):
                continue
            fix = (f"cast it (.to({dtype}))" if x.dtype != dtype else
                   "give it that shape (* is any size; a fixed size is the one the model was compiled at)")
            spec = ", ".join("*" if d is None else str(d) for d in dims)
            raise TpcError(f"input {name} is {str(x.dtype).removeprefix('torch.')} {list(x.shape)}; this pruned model "
                           f"takes {str(dtype).removeprefix('torch.')} [{spec}]: {fix}")

    def _check_length(self, args: tuple) -> None:
        """A token length outside the captured range refused in one line, as the .pt2 refuses it
        (its guard) and as the ONNX file is documented: one range for every artifact. Length 1 is
        outside it because torch.export specialises sizes 0 and 1, so a dynamic length starts at 2."""
        lengths = length_range(self.graph_module)
        length = next((x.shape[1] for x in args if is_token_input(x)), None)
        if lengths is None or length is None:
            return
        low, high = lengths
        if length < low or (high is not None and length > high):
            fix = f"pad the text to at least {low} tokens" if length < low else f"cut the text to {high} tokens"
            raise TpcError(f"this pruned model takes {length_span(lengths)} tokens (the range torch.export captured), not {length}: {fix}")

    def _by_position(self, args: tuple, kwargs: dict) -> tuple:
        """Keyword arguments (a tokenizer's output: ``pruned(**batch)``) in the captured inputs' order."""
        names = [n.target for n in self.graph_module.graph.find_nodes(op="placeholder")]
        unknown = [k for k in kwargs if k not in names[len(args):]]
        if unknown:
            given = "given twice" if unknown[0] in names else "not an input it was compiled with"
            raise TpcError(f"{unknown[0]!r} is {given}: this pruned model takes {', '.join(names)} (compile with "
                           "that input among the example inputs to pass it)")
        missing = [n for n in names[len(args):] if n not in kwargs]
        if missing:
            raise TpcError(f"missing input {missing[0]!r}: this pruned model takes {', '.join(names)}")
        return (*args, *(kwargs[n] for n in names[len(args):]))
