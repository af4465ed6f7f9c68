"""``compile_vlm``: capture a VLM's prefill, prune its visual tokens, return a ``VlmModule``.

Without ``layers`` the method prunes before the language model (stage 1); with ``layers``
it prunes after each of those decoder layers (stage 2; several layers make a PyramidDrop
schedule, each keeping its ratio of the visual tokens that reach it).
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from tpc.capture import eval_mode
from tpc.errors import TpcError, refusal_or_bug
from tpc.passes import PassManager
from tpc.registry import VISUAL, Where, get_method, methods_for
from tpc.schedule import kept_count, parse_keep, parse_layers
from tpc.vlm.family import family_of
from tpc.vlm.flops import prefill_flops
from tpc.vlm.module import Stage, VlmModule
from tpc.vlm.prune_visual import PruneVisual
from tpc.vlm.report import describe


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
            return torch.export.export(family.prefill(), args, dynamic_shapes=dynamic)
        except Exception as err:  # torch.export raises many types; the user needs one line, tpc's bugs a report
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise refusal_or_bug(err, f"torch.export could not capture the prefill of {type(family.model).__name__}: "
                                      f"{first}") from err


def stages_of(spec, visual: int, method: str, layers, keep) -> list[Stage]:
    chosen = get_method(method)
    if not chosen.applies(*VISUAL):
        raise TpcError(f"method {method!r} does not prune visual tokens: choose one of {', '.join(methods_for(*VISUAL))}")
    if chosen.needs_cls and not spec.vision_cls:
        others = ", ".join(m for m in methods_for(*VISUAL) if not get_method(m).needs_cls)
        raise TpcError(f"{spec.vision_tower} has no [CLS] token, so {method} cannot score its visual tokens with "
                       f"[CLS] attention: use {others}")
    if layers is not None and not chosen.applies(Where.VISUAL_IN_LM):
        raise TpcError(f"{method} prunes visual tokens only before the language model: drop layers (or use "
                       f"{', '.join(methods_for(Where.VISUAL_IN_LM))} to prune after a decoder layer)")
    if layers is None and not chosen.applies(Where.VISUAL_BEFORE_LM):
        raise TpcError(f"{method} prunes visual tokens only after a decoder layer (it reads that layer's attention): "
                       "give the layer(s) to prune after (--layers), or prune before the language model with "
                       + ", ".join(methods_for(Where.VISUAL_BEFORE_LM)))
    cuts = [0] if layers is None else [layer + 1 for layer in parse_layers(layers)]
    for cut in cuts:
        if cut - 1 >= spec.num_layers:
            raise TpcError(f"layer {cut - 1} is beyond the language model's depth: it has {spec.num_layers} decoder "
                           f"layers (0-{spec.num_layers - 1})")
        if cut == spec.num_layers:
            raise TpcError(f"pruning after the last decoder layer ({cut - 1}) saves nothing: choose a layer below "
                           f"{spec.num_layers - 1}")
    if len(_values(keep, len(cuts))) != len(cuts):
        raise TpcError(f"--keep has {len(_values(keep, len(cuts)))} values for {len(cuts)} pruning stages: give one "
                       "value, or one per layer")
    drop_all = _drop_all(keep, len(cuts))
    keeps = parse_keep([1 if d else k for d, k in zip(drop_all, _values(keep, len(cuts)))], len(cuts))
    stages = []
    for cut, k, drop in sorted(zip(cuts, keeps, drop_all), key=lambda stage: stage[0]):  # keeps travel with layers
        if drop and cut == 0:
            raise TpcError("keep 0 drops every visual token; before the language model that is a text-only prompt: "
                           "give the layer after which the text no longer needs them (ToDRE's second stage)")
        if isinstance(k, int) and k > visual:
            where = "before the language model" if cut == 0 else f"after decoder layer {cut - 1}"
            raise TpcError(f"{visual} visual tokens per example reach the pruning point {where}: cannot keep {k}; "
                           f"give a count up to {visual} or a ratio")
        out = 0 if drop else kept_count(k, visual, 0, cut - 1)
        stages.append(Stage(cut, method, visual, out))
        visual = out
    return stages


def _values(keep, count: int) -> list:
    """One keep value per stage; text as the CLI gives it ("0.25", "0.5,0") is parsed, 0 kept as 0."""
    if isinstance(keep, str):
        keep = [_text_value(v) for v in keep.split(",") if v.strip()]
        keep = keep[0] if len(keep) == 1 else keep
    return list(keep) if isinstance(keep, (list, tuple)) else [keep] * count


def _text_value(text: str):
    try:
        if float(text) == 0:
            return 0  # every visual token dropped (parse_keep refuses 0 for encoders)
    except ValueError:
        pass
    return parse_keep(text, 1)[0]


def _drop_all(keep, count: int) -> list[bool]:
    """Which stages keep 0 visual tokens (ToDRE's second stage drops every one left)."""
    values = _values(keep, count)
    return [v == 0 and not isinstance(v, bool) for v in values] if len(values) == count else [False] * count


def compile_vlm(model: nn.Module, inputs, *, method: str = "fastv", layers=None, keep=0.5, seed: int = 0,
                vision_layer: int | None = None) -> VlmModule:
    """Prune ``model``'s visual tokens with ``method``; see the module docstring for stages.

    ``vision_layer``: topk-cls (VTC-CLS) only, the vision layer whose [CLS] attention scores
    the visual tokens (default: the layer LLaVA takes its image features from).
    """
    family = family_of(model)
    example, visual = family.graph_args(processor_inputs(inputs))  # Qwen2-VL's encoder runs here, once
    plan = _plan(family, visual, method, layers, keep, vision_layer)  # refuse before capturing
    return _rewrite(family, _export(family, example, visual), inputs, example, plan, method, seed)


def prune(model: nn.Module, program: torch.export.ExportedProgram, inputs, *, method: str, layers=None, keep=0.5,
          seed: int = 0, vision_layer: int | None = None) -> VlmModule:
    """Rewrite a fresh copy of a captured prefill (``capture_prefill``); the program is not changed."""
    family = family_of(model)
    example, visual = family.graph_args(processor_inputs(inputs))
    return _rewrite(family, program, inputs, example, _plan(family, visual, method, layers, keep, vision_layer),
                    method, seed)


def _plan(family, visual: int, method: str, layers, keep, vision_layer) -> tuple[list[Stage], tuple | None]:
    """The stages, and for topk-cls the vision layer it reads; every refusal before any capture."""
    stages = stages_of(family.spec(), visual, method, layers, keep)
    needs_cls = get_method(method).needs_cls
    if vision_layer is not None and not needs_cls:
        readers = ", ".join(m for m in methods_for(*VISUAL) if get_method(m).needs_cls)
        raise TpcError(f"vision_layer chooses the [CLS] attention {readers} scores with; {method} does not "
                       "read the vision tower")
    return stages, family.cls_scoring(vision_layer) if needs_cls else None


def _rewrite(family, program, inputs, example: tuple, plan, method: str, seed: int) -> VlmModule:
    (stages, cls), spec, model = plan, family.spec(), family.model
    gm = program.module()
    prompt = inputs["input_ids"].shape[1]
    unpruned = prefill_flops(gm, prompt).total  # counted before the rewrite, on the same graph
    hidden = model.config.text_config.hidden_size
    PassManager([PruneVisual(s.before_layer, s.method, s.visual_in, s.visual_out, hidden, spec.image_token_id,
                             seed, cls) for s in stages])(gm)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs: the kept positions are extra outputs
    gm.recompile()
    pruned = prefill_flops(gm, prompt)
    report = describe(model, inputs, stages, method, (unpruned, pruned.total, pruned.scoring))
    report.vision_layer = cls[0] if cls else None
    return VlmModule(gm, model, family, stages, report, example, program)
