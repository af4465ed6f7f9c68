"""The pipeline, in one place: capture -> analyse -> passes -> lower, for every kind of model.

``tpc.compile`` (through :func:`compile_encoder`), ``tpc tune`` (:func:`prune_graph` on one
capture), the VLM path (``tpc.vlm.compile_vlm`` / ``prune`` through :func:`prune_prefill`) and the
decoder path (``tpc.decode.compile_decoder`` through :func:`rewrite_decode_step`) run these
stages; what they share is the normal form of the settings (:class:`tpc.recipe.Step`), the method
registry, the layer analysis (``tpc/graph``), passes under one ``PassManager``, and a module that
carries its report (docs/architecture.md, "One compiler, three kinds of model").

- capture: :func:`tpc.capture.capture` (an encoder: dynamic batch and token length),
  ``tpc.vlm.compile.capture_prefill`` (a VLM's prefill), ``tpc.decode.capture_step`` (one decode step);
- analyse: :func:`analyze` (attention sites) and :func:`prefix_of` (prefix tokens); a VLM's
  decoder layers and visual mask, a decoder's attention over the cache (read by their passes);
- passes: ``InsertPrune`` per step, then ``ProportionalAttention`` and ``FuseAttentionScores``;
  ``PruneVisual`` per VLM step; the registry's decode-time pass for a decoder;
- lower: ``TpcModule`` (``tpc.export`` writes ONNX, ``.pt2`` or an engine), ``VlmModule``
  (prefill + ``generate()``), ``DecodeModule`` (``generate()`` over a KV buffer).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from tpc.capture import capture, is_token_input, length_range, length_span
from tpc.compiled import CompileReport, LayerInfo, TpcModule
from tpc.decode.capture import capture_step
from tpc.decode.module import DecodeModule, describe as describe_decoder
from tpc.decode.plan import Plan
from tpc.errors import TpcError
from tpc.flops import count_flops, example_size, example_sizes
from tpc.graph import count_prefix_tokens, find_attention_sites, find_stream_point
from tpc.graph.nodes import describe, val
from tpc.passes import FuseAttentionScores, InsertPrune, PassManager, ProportionalAttention, compactions
from tpc.record import pruned_outputs, remember_unpruned
from tpc.recipe import Step, check_steps, steps_from_pass
from tpc.registry import Where, get_method
from tpc.vlm.flops import prefill_flops
from tpc.vlm.module import VlmModule
from tpc.vlm.prune_visual import PruneVisual
from tpc.vlm.report import describe as describe_vlm


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


def compile_encoder(module: nn.Module, inputs: tuple, name: str, steps: list[Step] | None, *, every_layer=None,
                    prefix: int | None = None, after: str = "attention", seed: int = 0, restore: bool = False,
                    dynamic_length: bool = True, notes=()) -> TpcModule:
    """An encoder: capture, analyse, passes, lower. ``steps`` None: ``every_layer`` = (method, keep, r,
    options) at every attention layer the capture has, as ToMe merges by default."""
    gm = capture(module, inputs, dynamic_length=dynamic_length)
    if steps is None:  # every layer: ToMe's r (a list padded with 0, or a schedule)
        method, keep, r, options = every_layer
        steps = check_steps(steps_from_pass(method, list(range(len(analyze(gm, name)))), keep, r, options, pad=True))
    return prune_graph(gm, inputs, name, steps, prefix=prefix, after=after, seed=seed, restore=restore, notes=notes)


def describe_encoder(module: nn.Module, inputs: tuple, name: str, after: str = "attention", notes=()) -> CompileReport:
    """An encoder unpruned: capture and analyse only (``tpc inspect`` without layers)."""
    gm = capture(module, inputs)
    sites = analyze(gm, name)
    prefix, source = prefix_of(gm, sites)
    flops = count_flops(gm).total
    return CompileReport(model=name, method=None, layers=[], keep=[], prefix=prefix, prefix_source=source,
                         insert_after=after, sites=layer_infos(sites, {}, sizes=example_sizes(gm)),
                         flops_before=flops, flops_after=flops, notes=list(notes))


def prune_prefill(family, program, inputs, example: tuple, steps: list[Step], scoring,
                  seed: int) -> VlmModule:
    """A VLM: a fresh copy of its captured prefill (``program`` is not changed), ``PruneVisual`` per
    step (the steps of ``tpc.vlm.compile.stages_of``), lowered to a ``VlmModule``."""
    spec, model = family.spec(), family.model
    gm = program.module()
    prompt = inputs["input_ids"].shape[1]
    unpruned = prefill_flops(gm, prompt).total  # counted before the rewrite, on the same graph
    hidden = model.config.text_config.hidden_size
    PassManager([PruneVisual(s.layer + 1, s.method, s.tokens_in, s.tokens_out, hidden, spec.image_token_id,
                             seed, scoring) for s in steps])(gm)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs: the kept positions are extra outputs
    gm.recompile()
    pruned = prefill_flops(gm, prompt)
    report = describe_vlm(model, inputs, steps, steps[0].method if steps else None,
                          (unpruned, pruned.total, pruned.scoring))
    report.vision_scoring = scoring
    remember_unpruned(gm, program.module)
    return VlmModule(gm, model, family, steps, report, example, program)


def rewrite_decode_step(model: nn.Module, plan: Plan, program=None) -> DecodeModule:
    """A decoder LM: its decode step (``program``, or captured now), the registry's decode-time pass
    for the plan's method, lowered to a ``DecodeModule``."""
    program = program if program is not None else capture_step(model)
    gm = program.module()
    rewrite = get_method(plan.method, Where.DECODE).implementation(Where.DECODE)  # the method's pass
    PassManager([rewrite(plan)])(gm)
    remember_unpruned(gm, program.module)
    return DecodeModule(gm, model, describe_decoder(model, plan), program, plan)
