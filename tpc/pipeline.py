"""The encoder pipeline, in one place: capture -> analyse -> passes -> lower.

``tpc.compile`` and ``tpc tune`` run it; the VLM path (``tpc.vlm.compile``) and the decoder path
(``tpc.decode.compile``) run the same stages on what they capture (docs/architecture.md, "One
compiler, three kinds of model"): a method from :mod:`tpc.registry`, passes under one
``PassManager``, a module that carries its report.

- capture: :func:`tpc.capture.capture` (torch.export, dynamic batch and token length);
- analyse: :func:`analyze` (attention sites) and :func:`prefix_of` (prefix tokens);
- passes: :func:`prune_graph` runs ``InsertPrune`` per step, then ``ProportionalAttention`` and
  ``FuseAttentionScores``;
- lower: the ``TpcModule`` it returns, which ``tpc.export`` writes as ONNX, ``.pt2`` or an engine.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from tpc.capture import is_token_input, length_range, length_span
from tpc.compiled import CompileReport, LayerInfo, TpcModule
from tpc.errors import TpcError
from tpc.flops import count_flops, example_size, example_sizes
from tpc.graph import count_prefix_tokens, find_attention_sites, find_stream_point
from tpc.graph.nodes import describe, val
from tpc.passes import FuseAttentionScores, InsertPrune, PassManager, ProportionalAttention, compactions
from tpc.record import pruned_outputs, remember_unpruned
from tpc.recipe import Step


def analyze(gm: fx.GraphModule, name: str = "model") -> list:
    """The attention sites of a captured encoder, numbered in graph order; one line when there are none, or
    when they attend within windows (no global token axis to prune)."""
    sites = find_attention_sites(gm)
    if not sites:
        einsum = next(iter(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.einsum.default)), None)
        raise TpcError(
            f"no attention layers found in {name}: tpc prunes the tokens of transformer models "
            "(scaled_dot_product_attention or softmax(q·kᵀ)·v in the exported graph)"
            + ("" if einsum is None else f"; einsum {einsum.args[0]!r} ({describe(einsum)}) is not one matrix "
               "product tpc reads as attention: write q·kᵀ and p·v as two-operand einsums with an explicit "
               "output ('bhqd,bhkd->bhqk', 'bhqk,bhkd->bhqd') or as matmuls")
        )
    windowed = next((s for s in sites if s.windows > 1), None)
    if windowed is not None:
        raise TpcError(
            f"{name} uses windowed or hierarchical attention ({windowed.module or 'layer ' + str(windowed.layer)} "
            f"attends within {windowed.windows} windows of {windowed.tokens} tokens): its layers need the full token "
            "grid to form windows, so tpc cannot prune them; use a plain (global-attention) ViT"
        )
    return sites


def prefix_of(gm: fx.GraphModule, sites) -> tuple[int, str]:
    """The prefix tokens ([CLS], distillation, registers) before the first attention layer, and how they were found."""
    point = find_stream_point(gm, sites[0])
    return count_prefix_tokens(point.skip, point)


def layer_infos(sites, kept: dict[int, int], removals: dict | None = None, sizes: dict | None = None,
                 methods: dict[int, str] | None = None) -> list[LayerInfo]:
    """One row per attention site found before pruning; tokens are read from its queries now (with a
    symbolic length, at the example length: ``sizes``)."""
    removals, methods = removals or {}, methods or {}
    return [LayerInfo(s.layer, s.module, s.kind, s.heads, example_size(val(s.q).shape[-2], sizes or {}), kept.get(s.layer),
                      *removals.get(s.layer, (None, None)), methods.get(s.layer)) for s in sites]


def length_notes(gm: fx.GraphModule, keeps: list, inputs: tuple) -> list[str]:
    """What a symbolic sequence length means for this compile, said once in the report."""
    lengths = length_range(gm)
    if lengths is None:
        return []
    example = next(x.shape[1] for x in inputs if is_token_input(x))
    notes = [f"the sequence length is dynamic ({length_span(lengths)} tokens): one graph serves every length; a ratio keeps "
             f"ceil(ratio x n) of the n non-prefix tokens a layer sees (at least 1); the token counts and FLOPs above are "
             f"at the example length {example}; seq_len=N (--seq-len N) fixes the length instead"]
    counts = sorted({int(k) for k in keeps if isinstance(k, int) and not isinstance(k, bool)})
    if counts:
        notes.append(f"keep given as a token count ({', '.join(map(str, counts))}) is clamped to the non-prefix tokens a "
                     "layer sees: shorter sequences keep all of theirs")
    return notes


def prune_graph(gm: fx.GraphModule, inputs: tuple, name: str, steps: list[Step], *, prefix: int | None = None,
                after: str = "attention", seed: int = 0, restore: bool = False, notes=()) -> TpcModule:
    """Run the pass pipeline for validated ``steps`` on a captured graph (rewritten in place)."""
    sites = analyze(gm, name)
    for step in steps:
        if step.layer >= len(sites):
            raise TpcError(f"layer {step.layer} is out of range: {name} has {len(sites)} attention layers (0-{len(sites) - 1})")
    if prefix is None:
        prefix, prefix_source = prefix_of(gm, sites)
    else:
        prefix_source = "given"
    flops_before = count_flops(gm).total

    passes = [InsertPrune(step.method, step.layer, step.amount, prefix, after, seed, step.options, restore)
              for step in steps]
    passes += [ProportionalAttention(), FuseAttentionScores()]
    unpruned = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # its nodes only: parameters are shared
    PassManager(passes)(gm)
    remember_unpruned(gm, lambda: unpruned)
    removals = {p.layer: p.removal for p in passes if isinstance(p, InsertPrune) and p.removal is not None}

    notes = [*notes, *length_notes(gm, [s.amount for s in steps], inputs)]
    sizes = example_sizes(gm)
    kept = {c.layer: example_size(val(c.index).shape[1], sizes) for c in compactions(gm)}
    methods = {s.layer: s.method for s in steps}
    flops = count_flops(gm)
    names = list(dict.fromkeys(s.method for s in steps))
    report = CompileReport(
        model=name, method="+".join(names), layers=[s.layer for s in steps], keep=[str(s.amount) for s in steps],
        options=steps[0].options if len(names) == 1 else {s.layer: s.options for s in steps if s.options},
        prefix=prefix, prefix_source=prefix_source, insert_after=after, sites=layer_infos(sites, kept, removals, sizes, methods),
        flops_before=flops_before, flops_after=flops.total,
        flops_scoring=flops.scoring, pruned_outputs=pruned_outputs(gm),
        passes=[p.name for p in passes], notes=list(notes),
    )
    return TpcModule(gm, report, inputs)
