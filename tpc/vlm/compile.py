"""``compile_vlm``: capture a VLM's prefill, prune its visual tokens, return a ``VlmModule``.

What is the VLM's own: its capture (``capture_prefill``) and the check of the steps against it
(``stages_of``); the passes and the lowering run in :func:`tpc.pipeline.prune_prefill`.

Without ``layers`` the method prunes before the language model (stage 1); with ``layers``
it prunes after each of those decoder layers (stage 2; several layers make a PyramidDrop
schedule, each keeping its ratio of the visual tokens that reach it).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from tpc import pipeline
from tpc.capture import eval_mode
from tpc.errors import TpcError, refusal_or_bug
from tpc.passes.cleanup import remove_dead_code
from tpc.registry import VISUAL, get_method, methods_for
from tpc.recipe import Step, visual_steps
from tpc.schedule import check_seed, kept_count
from tpc.decode.plan import Plan
from tpc.vlm.decode import compress, decode_plan, decode_settings, rewrite
from tpc.vlm.family import family_of
from tpc.vlm.module import VlmModule
from tpc.vlm.spec import VisionScoring


def processor_inputs(inputs) -> dict:
    """Processor outputs (a dict or a BatchFeature) as a dict with an attention mask."""
    if not hasattr(inputs, "keys") or "input_ids" not in inputs or "pixel_values" not in inputs:
        raise TpcError("a VLM takes its processor's outputs as example inputs: a dict with input_ids and pixel_values")
    out = dict(inputs.items())
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def capture_prefill(model: nn.Module, inputs) -> torch.export.ExportedProgram:
    """The prefill as an aten program with symbolic batch and prompt length (reusable: see ``prune``)."""
    family = family_of(model)
    return _export(family, *family.graph_args(processor_inputs(inputs)))


def _export(family, args: tuple, visual: int) -> torch.export.ExportedProgram:
    if args[0].shape[0] < 2:  # a batch of one would be captured as a constant
        args = family.twice(args)
    dynamic = family.dynamic_shapes(args, visual)
    with eval_mode(family.model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(family.prefill(), args, dynamic_shapes=dynamic)
        except Exception as err:  # torch.export raises many types; the user needs one line, tpc's bugs a report
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise refusal_or_bug(err, f"torch.export could not capture the prefill of {type(family.model).__name__}: "
                                      f"{first}") from err
    remove_dead_code(program.graph_module)  # e.g. LLaVA's last vision layer: it reads layer -2
    return program


def stages_of(spec, visual: int, method: str, layers, keep) -> list[Step]:
    """The steps :func:`tpc.recipe.visual_steps` parses, checked against this VLM, each with the visual
    tokens per example it chooses among and keeps (``tokens_in``, ``tokens_out``)."""
    steps = visual_steps(method, layers, keep)
    for step in steps:
        if step.layer >= spec.num_layers:
            raise TpcError(f"layer {step.layer} is beyond the language model's depth: it has {spec.num_layers} decoder "
                           f"layers (0-{spec.num_layers - 1})")
        if step.layer == spec.num_layers - 1:
            raise TpcError(f"pruning after the last decoder layer ({step.layer}) saves nothing: choose a layer below "
                           f"{spec.num_layers - 1}")
    out = []
    for step in steps:
        if isinstance(step.keep, int) and step.keep > visual:
            where = "before the language model" if step.layer < 0 else f"after decoder layer {step.layer}"
            raise TpcError(f"{visual} visual tokens per example reach the pruning point {where}: cannot keep "
                           f"{step.keep}; give a count up to {visual} or a ratio")
        kept = kept_count(step.keep, visual, 0, step.layer)
        out.append(replace(step, tokens_in=visual, tokens_out=kept))
        visual = kept
    return out


def compile_vlm(model: nn.Module, inputs, *, method: str = "fastv", layers=None, keep=0.5, seed: int = 0,
                vision_layer: int | list[int] | None = None, decode=None) -> VlmModule:
    """Prune ``model``'s visual tokens with ``method``; see the module docstring for stages.

    ``vision_layer``: topk-cls only, the vision layer whose attention scores the visual tokens
    ([CLS] attention, VTC-CLS; attention received on a tower without [CLS]), or a list of layers
    whose scores are summed (VTC-CLS's ensemble); default: the layer the features come from.
    ``decode``: decode-time sparse attention for the decode steps, ``{"method": "tidal", "layers": [2, 15],
    "keep": 256, "options": {}}``, or a compressed KV cache, ``{"method": "h2o", "keep": 256}`` (``tpc.vlm.decode``);
    None: the stock decoder layers, dense.
    """
    family = family_of(model)
    example, visual = family.graph_args(processor_inputs(inputs))  # Qwen2-VL's encoder runs here, once
    plan, seed = _plan(family, visual, method, layers, keep, vision_layer), check_seed(seed)  # refuse before capturing
    step_plan = _decode_plan(model, plan[0], decode)
    pruned = pipeline.prune_prefill(family, _export(family, example, visual), inputs, example, *plan, seed)
    return _with_decoder(pruned, model, step_plan, None)


def prune(model: nn.Module, program: torch.export.ExportedProgram, inputs, *, method: str, layers=None, keep=0.5,
          seed: int = 0, vision_layer: int | list[int] | None = None, decode=None,
          decode_program: torch.export.ExportedProgram | None = None) -> VlmModule:
    """Rewrite a fresh copy of a captured prefill (``capture_prefill``); the program is not changed.
    ``decode_program``: the language model's decode step captured before (``tpc.vlm.decode.capture_decode_step``)."""
    family = family_of(model)
    example, visual = family.graph_args(processor_inputs(inputs))
    plan = _plan(family, visual, method, layers, keep, vision_layer)
    step_plan = _decode_plan(model, plan[0], decode)
    pruned = pipeline.prune_prefill(family, program, inputs, example, *plan, check_seed(seed))
    return _with_decoder(pruned, model, step_plan, decode_program)


def _decode_plan(model, stages, decode):
    if decode is None:
        return None
    return decode_plan(model, stages, decode_settings(decode))


def _with_decoder(pruned: VlmModule, model, plan, program) -> VlmModule:
    if isinstance(plan, Plan):
        pruned.attach_decoder(rewrite(model, plan, program))
    elif plan is not None:  # a compressed KV cache's settings
        pruned.attach_decoder(compress(model, pruned, plan, program))
    return pruned


def _plan(family, visual: int, method: str, layers, keep, vision_layer) -> tuple[list[Step], VisionScoring | None]:
    """The stages, and for topk-cls how it scores from the vision tower; every refusal before any capture."""
    stages = stages_of(family.spec(), visual, method, layers, keep)
    needs_cls = get_method(method).needs_cls
    if vision_layer is not None and not needs_cls:
        readers = ", ".join(m for m in methods_for(*VISUAL) if get_method(m).needs_cls)
        raise TpcError(f"vision_layer chooses the [CLS] attention {readers} scores with; {method} does not "
                       "read the vision tower")
    return stages, family.cls_scoring(vision_layer) if needs_cls else None
