"""The public API: ``compile``, ``export``, ``inspect``."""

from __future__ import annotations

import difflib
import inspect as inspect_module
import logging
import os
from pathlib import Path

import torch
from torch import nn

from tpc import decode as decoders, models, vlm
from tpc.backends import check_backend
from tpc.capture import is_token_input, set_eval
from tpc.compiled import CompileReport
from tpc.errors import TpcError
from tpc.exports import to_onnxruntime, write_artifact
from tpc.passes import get_method
from tpc.pipeline import compile_encoder, describe_encoder
from tpc.recipe import check_steps, load_recipe, steps_from_pass
from tpc.registry import DEFAULT_METHOD, METHODS, VISUAL, Where, methods_for
from tpc.schedule import parse_layers, read_r

logger = logging.getLogger("tpc")

INSERT_POINTS = ("attention", "block")


LOAD_KEYWORDS = ("weights", "random_weights", "weights_seed", "model_args", "input_size")


def _check_keywords(function: str, given: dict, accepted) -> None:
    """Refuse a keyword ``function`` does not take, naming the nearest one it does."""
    for key in given:
        if key not in accepted:
            near = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f"; did you mean {near[0]}=?" if near else f"; it takes {', '.join(accepted)}"
            raise TpcError(f"{function} has no keyword {key!r}{hint}")


def _resolve(model, example_inputs, **load_kwargs) -> tuple[nn.Module, tuple, str]:
    if isinstance(model, (str, os.PathLike)):
        loaded = models.load(str(model), **load_kwargs)
        set_eval(loaded.module)  # tpc built this module: it is an inference model
        loaded.module.requires_grad_(False)
        inputs = loaded.example_inputs if example_inputs is None else example_inputs
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        return loaded.module, _positional(loaded.module, inputs), loaded.name
    if not isinstance(model, nn.Module):
        raise TpcError(f"tpc.compile takes an nn.Module or a model id, not {type(model).__name__}")
    given = [k for k, v in load_kwargs.items() if v]
    if given:
        raise TpcError(f"{', '.join(given)} apply to model ids, which tpc loads; for an nn.Module, load the weights "
                       "into it and pass example_inputs")
    if example_inputs is None and hasattr(getattr(model, "config", None), "model_type"):
        example_inputs = models.hf_example_inputs(model.config, model, None)  # a transformers model
    if example_inputs is None:
        size = models.image_size_of(model)
        if size is None:
            raise TpcError(f"pass example_inputs for {type(model).__name__}: tpc cannot guess its input shape")
        example_inputs = models.example_images(size)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return model, _positional(model, example_inputs), type(model).__name__


def _positional(module: nn.Module, inputs) -> tuple | dict:
    """Example inputs as forward's leading positional arguments: a dict (a tokenizer's output) is
    ordered by forward's signature; a VLM keeps its processor outputs as a dict."""
    if not hasattr(inputs, "keys"):
        return tuple(inputs)
    if vlm.is_vlm(module):
        return inputs
    names = list(inspect_module.signature(module.forward).parameters)[:len(inputs)]
    if set(names) != set(inputs.keys()):
        raise TpcError(f"example_inputs {', '.join(inputs.keys())} are not the leading arguments of "
                       f"{type(module).__name__}.forward ({', '.join(names)}): pass a tuple in forward's order")
    return tuple(inputs[name] for name in names)


def _maybe_vlm(model, method: str, layers) -> bool:
    """Whether compile must load the model before parsing encoder options: it may be a VLM, which
    takes no layers when the method prunes its visual tokens before the language model."""
    if isinstance(model, nn.Module):
        return vlm.is_vlm(model)
    known = METHODS.get(method)
    before_lm = known is not None and known.applies(Where.VISUAL_BEFORE_LM)
    return _visual_only(method) or (layers is None and before_lm and models.could_be_vlm(str(model)))


def _visual_only(method) -> bool:
    """Whether ``method`` prunes a VLM's visual tokens but no encoder's tokens (fastv)."""
    known = METHODS.get(method)
    return known is not None and known.applies(*VISUAL) and not known.applies(Where.ENCODER)


def _usage_notes(module: nn.Module) -> list[str]:
    """What tpc did about a module in training mode or with trainable parameters, said plainly."""
    notes = []
    if any(m.training for m in module.modules()):
        notes.append("the model was in training mode: tpc compiled its eval-mode graph (dropout off, "
                     "normalization statistics frozen) and left your module as it was")
    if any(p.requires_grad for p in module.parameters()):
        notes.append("the pruned module is for inference: it runs without autograd and shares (never changes) "
                     "your module's parameters")
    for note in notes:
        logger.info(note)
    return notes


def _fix_length(inputs: tuple, seq_len: int | None) -> tuple:
    """The example inputs with every token input at ``seq_len`` tokens (cut, or padded with padding
    tokens: id 0, mask 0); unchanged when ``seq_len`` is None."""
    if seq_len is None:
        return inputs
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise TpcError(f"seq_len must be a token count >= 2, not {seq_len!r}")
    if not any(is_token_input(x) for x in inputs):
        raise TpcError("seq_len (--seq-len) fixes the length of token inputs ([B, N] integer tensors), and this model "
                       "takes none: images keep the fixed size they were given")

    def fit(x):
        if not is_token_input(x):
            return x
        if x.shape[1] >= seq_len:
            return x[:, :seq_len].clone()  # a view would make torch.export guard on its base, which ONNX export cannot evaluate
        return torch.cat([x, x.new_zeros(x.shape[0], seq_len - x.shape[1])], dim=1)

    return tuple(fit(x) for x in inputs)


def parse_options(options) -> dict | None:
    """A method's options as a dict, also from the CLI's ``"key=value,key=value"`` string form."""
    if options is None or isinstance(options, dict):
        return options
    if isinstance(options, str):
        return models.parse_model_args(options)
    raise TpcError(f"options is a dict such as {{'iterations': 3}} or a string such as 'iterations=3', "
                   f"not a {type(options).__name__}")


def compile(model, example_inputs=None, *, method: str = DEFAULT_METHOD, layers=None, keep=None, r=None,
            prefix: int | None = None, after: str | None = None, seed: int | None = None, options: dict | str | None = None,
            restore: bool = False, backend: str = "torch", seq_len: int | None = None, recipe=None,
            vision_layer: int | list[int] | None = None, decode: dict | str | None = None,
            **load_kwargs) -> nn.Module:
    """Prune ``model``'s tokens after ``layers`` with ``method``; returns an nn.Module.

    ``model`` is an ``nn.Module`` or a model id (see :func:`tpc.models.load`, which takes
    ``weights``, ``random_weights`` (drawn with ``weights_seed``), ``model_args`` and ``input_size``);
    ``keep`` is a ratio (default 0.7), a list with one ratio per layer, or token counts (ints);
    ``r`` (as in ToMe) is instead the number of tokens each layer removes: an int, a per-layer list, or ToMe's
    ``(r, inflection)`` schedule, clamped per layer by the method (tome: as ToMe clamps it).
    ``layers=None`` is an error, except for tome, which then merges at every layer as ToMe does. ``after`` is "attention" (the block's
    MLP already runs on fewer tokens; the default) or "block"; ``seed`` (default 0) draws the random
    method. ``options`` are the method's own settings (see ``tpc passes``). ``restore=True`` brings the full sequence back after the last block,
    dropped tokens unchanged, for models whose outputs need every position.
    ``recipe`` (a recipe.json path, a :class:`tpc.recipe.Recipe`, or a list of steps such as
    ``[{"layer": 0, "method": "tome", "r": 8}, {"layer": 4, "method": "topk-cls", "keep": 0.6}]``)
    gives a method per layer instead of ``method``/``layers``/``keep``/``r``/``options``; its own
    ``after`` and ``seed`` then prune (giving ``after`` or ``seed`` too is refused).
    ``backend="onnxruntime"`` returns the ONNX Runtime session of the exported model, checked
    against the torch module. Text models (token inputs [B, N]) are captured with a dynamic
    sequence length, so the pruned module and its artifacts take any length;
    ``seq_len=N`` fixes the length at N instead (the example inputs cut or padded to N).
    ``vision_layer`` (VLMs, topk-cls only): the vision layer whose [CLS] attention VTC-CLS scores
    the visual tokens with (default: the layer LLaVA takes its image features from), or a list of
    layers whose scores are summed (VTC-CLS's ensemble); on a tower without [CLS] (SmolVLM) the
    attention each patch receives scores instead (docs/vlm.md).
    A decode-time method (``tidal``, ``quest``, ``dhsa``) on a causal LM returns a :class:`tpc.decode.DecodeModule`
    whose decode step reads, in the sparse layers, ``keep`` cached positions (a float in (0, 1]: that
    ratio of the cache, ceil(keep × L) of its L positions at each step) chosen at the
    selection ``layers`` (tidal), or the pages worth ``keep`` positions each quest layer chooses
    (quest, ``options={"page": 16}``), or the ``keep`` positions of the best chunks each dhsa layer
    chooses (dhsa, ``options={"min_chunk": 8, "max_chunk": 64, "threshold": 0.5}``; docs/decode.md); ``pruned.generate(**tokenizer_outputs)`` decodes.
    A KV-eviction method (``streaming``, ``h2o``, ``snapkv``, ``scissorhands``) returns a
    :class:`tpc.decode.CompressedDecoder` whose ``generate`` keeps ``keep`` cached positions per
    layer (a count, or a ratio of the prompt).
    ``decode`` (VLMs): the decode steps' sparse attention (or a compressed KV cache: h2o, snapkv, scissorhands,
    streaming, with ``keep`` and ``options``) beside the prefill's visual-token pruning, a decode-time
    method's settings ``{"method": "tidal", "layers": [2, 15], "keep": 256, "options": {...}}`` (or its name alone:
    its defaults); the returned :class:`tpc.vlm.VlmModule` prefills pruned and decodes sparse (docs/vlm.md).
    """
    _check_keywords("tpc.compile", load_kwargs, COMPILE_KEYWORDS)
    check_backend(backend, ("torch", "onnxruntime"), "tpc.compile")
    if decode is not None:
        decode = _decode_settings(method, recipe, decode)
    if recipe is None and decoders.decode_time(method):
        _refuse_encoder_settings(method, r=r, prefix=prefix, seq_len=seq_len, restore=restore,
                                 vision_layer=vision_layer, backend=backend, after=after)
        options = parse_options(options)
        decoders.check_settings(method, layers, keep, options)  # malformed settings fail before the model loads
        module, _, name = _resolve(model, example_inputs, **load_kwargs)
        decoders.refuse_decode_step(module, name)
        models.refuse_pruned(module, name)
        return decoders.compile_decoder(module, method=method, layers=layers, keep=keep, options=options)
    if recipe is None and decoders.kv_eviction(method):
        not_kv = (r, prefix, seq_len, layers, restore or None, vision_layer, None if backend == "torch" else backend,
                  None if after in (None, "attention") else after)
        if any(v is not None for v in not_kv):
            raise TpcError(f"{method} (a compressed KV cache) takes method, keep and options only (layers, r, prefix, "
                           "restore, seq_len, after, vision_layer and backends other than torch are for the other "
                           "methods)")
        options = parse_options(options)
        decoders.eviction_rule(method, keep, options)  # malformed settings fail before the model loads
        module, _, name = _resolve(model, example_inputs, **load_kwargs)
        decoders.refuse_decode_step(module, name)
        models.refuse_pruned(module, name)
        return decoders.compile_compressed(module, method=method, keep=keep, options=options)
    if recipe is not None and (layers is not None or keep is not None or r is not None or options):
        raise TpcError("give either a recipe or method/layers/keep/r/options, not both")
    if recipe is not None and (seed is not None or after is not None):
        raise TpcError("a recipe holds its own after and seed (what it was tuned with): drop after/seed "
                       "(--after/--seed), or edit them in the recipe")
    if r is not None and keep is not None:
        raise TpcError("--r and --keep both set how many tokens each layer keeps: pass one of them")
    keep = 0.7 if keep is None else keep
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
        raise TpcError(f"--prefix is the number of leading tokens always kept (0 or more), not {prefix!r}")
    options = parse_options(options)

    def compile_vlm(module, inputs):
        encoder_only = (r, prefix, seq_len, given_options or None, restore or None, None if backend == "torch" else backend,
                        None if after in (None, "attention") else after)
        if any(v is not None for v in encoder_only):
            raise TpcError("a VLM takes method, layers, keep, seed and vision_layer only (r, prefix, restore, options, "
                           "seq_len, after and backends other than torch are for encoders)")
        return vlm.compile_vlm(module, inputs, method=method, layers=layers, keep=keep, seed=seed or 0,
                               vision_layer=vision_layer, decode=decode)

    given_options = options
    resolved = None
    if recipe is None and (decode is not None or _maybe_vlm(model, method, layers)):
        resolved = _resolve(model, example_inputs, **load_kwargs)
        if vlm.is_vlm(resolved[0]):
            return compile_vlm(*resolved[:2])
        if decode is not None:
            raise TpcError(f"decode (--decode) gives a vision-language model's decode steps sparse attention or a "
                           f"compressed KV cache ({', '.join(vlm.FAMILIES)}); {resolved[2]} is not one: for a decoder "
                           "language model give "
                           f"the decode-time method itself (--pass {decode['method']})")
    if vision_layer is not None and isinstance(model, nn.Module) and not vlm.is_vlm(model):
        refuse_vision_layer(type(model).__name__)
    if recipe is None and _visual_only(method):
        raise TpcError(f"{method} prunes the visual tokens of a vision-language model ({', '.join(vlm.FAMILIES)}); "
                       f"{type(model).__name__ if isinstance(model, nn.Module) else model} is not one")
    if recipe is not None:
        loaded = load_recipe(recipe)
        steps, after, seed = loaded.steps, loaded.after, loaded.seed
    else:
        spec = get_method(method, Where.ENCODER)
        options = spec.resolve_options(options)
        every_layer = layers is None and spec.every_layer_by_default  # ToMe merges at every layer
        layer_list = None if every_layer else parse_layers(layers)
        if r is not None:
            read_r(r)  # a malformed r fails before the model loads
        if layer_list is not None:
            steps = check_steps(steps_from_pass(method, layer_list, keep, r, options))
    after, seed = after or "attention", models.check_seed(seed or 0)
    if after not in INSERT_POINTS:
        raise TpcError(f"unknown insertion point {after!r}: choose one of {', '.join(INSERT_POINTS)}")
    module, inputs, name = resolved or _resolve(model, example_inputs, **load_kwargs)
    if vlm.is_vlm(module):  # a VLM named by path, with a method and layers an encoder could take too
        if recipe is not None:
            raise TpcError("a recipe is for encoders; a VLM takes method, layers, keep, seed and vision_layer")
        return compile_vlm(module, inputs)
    if vision_layer is not None:
        refuse_vision_layer(name)
    tuned_on = loaded.info.get("model") if recipe is not None else None
    if tuned_on and tuned_on != name:
        logger.warning("the recipe was tuned on %s, not %s: the drop and FLOPs it records were measured on that "
                       "model (tune this one with `tpc tune` to know them here)", tuned_on, name)
    decoders.refuse_encoder_method(module, name, method if recipe is None else steps[0].method)
    models.refuse_pruned(module, name)
    inputs = _fix_length(inputs, seq_len)
    if seq_len is not None:
        models.check_text_length(module, seq_len, "seq_len (--seq-len)")
    notes = _usage_notes(module)
    every_layer = recipe is None and layer_list is None  # ToMe's r at every layer the capture finds
    pruned = compile_encoder(module, inputs, name, None if every_layer else steps,
                             every_layer=(method, keep, r, options) if every_layer else None, prefix=prefix,
                             after=after, seed=seed, restore=restore, dynamic_length=seq_len is None, notes=notes)
    if backend == "onnxruntime":
        return to_onnxruntime(pruned)
    return pruned


COMPILE_KEYWORDS = (*(name for name, p in inspect_module.signature(compile).parameters.items()
                      if p.kind is p.KEYWORD_ONLY), *LOAD_KEYWORDS)


def refuse_vision_layer(name: str) -> None:
    raise TpcError(f"vision_layer chooses the vision layer whose [CLS] attention topk-cls (VTC-CLS) scores a "
                   f"vision-language model's visual tokens with; {name} is not one: drop vision_layer (--vision-layer)")


def _decode_settings(method, recipe, decode) -> dict:
    """A VLM's ``decode`` settings, checked before any model loads; refused beside a recipe or a decode-time method."""
    if recipe is not None:
        raise TpcError("decode (--decode) is for a vision-language model, and a recipe for encoders: drop one")
    if decoders.decode_time(method) or decoders.kv_eviction(method):
        raise TpcError(f"{method} prunes at decode time: with decode (--decode), method (--pass) is the visual-token "
                       f"method of a VLM's prefill ({', '.join(methods_for(*VISUAL))}); for a decoder language model "
                       f"give {method} alone")
    return vlm.decode_settings(decode)


def prunes(method: str, layers) -> bool:
    """Whether a compile with these settings prunes: layers are named, or the method (tome)
    prunes every layer by default."""
    return layers is not None or get_method(method).every_layer_by_default


def _refuse_encoder_settings(method: str, *, r=None, prefix=None, seq_len=None, restore=False, vision_layer=None,
                             backend="torch", after=None, **_) -> None:
    """A decode-time method takes method, layers, keep and options: refuse the encoders' settings given
    with one (``tpc.compile`` and ``tpc.inspect`` alike), rather than ignore them."""
    encoder_only = (r, prefix, seq_len, restore or None, vision_layer,
                    None if backend in (None, "torch") else backend, None if after in (None, "attention") else after)
    if any(v is not None for v in encoder_only):
        raise TpcError(f"{method} (decode-time sparse attention) takes method, layers, keep and options only (r, "
                       "prefix, restore, seq_len, after, vision_layer and backends other than torch are for "
                       "encoders and VLMs)")


def inspect(model, example_inputs=None, **compile_kwargs) -> CompileReport:
    """The report of a compile (attention sites, tokens per layer, FLOPs) without writing anything.

    Without ``layers`` it describes the unpruned model (for tome: merging at every layer).
    """
    _check_keywords("tpc.inspect", compile_kwargs, COMPILE_KEYWORDS)
    if compile_kwargs.get("decode") is not None:  # a VLM's prefill pruning and decode plan: the compile's report
        return compile(model, example_inputs, **compile_kwargs).report
    decoders.refuse_kv_artifact(compile_kwargs.get("method"), "inspect")
    if decoders.decode_time(compile_kwargs.get("method")):  # the plan says what each layer reads: no capture needed
        settings = {k: v for k, v in compile_kwargs.items() if k not in ("method", "layers", "keep")}
        load_kwargs = {k: settings.pop(k) for k in LOAD_KEYWORDS if k in settings}
        settings.pop("options", None)
        _refuse_encoder_settings(compile_kwargs["method"], **settings)
        options = parse_options(compile_kwargs.get("options"))
        decoders.check_settings(compile_kwargs["method"], compile_kwargs.get("layers"), compile_kwargs.get("keep"),
                                options)
        module, _, name = _resolve(model, example_inputs, **load_kwargs)
        decoders.refuse_decode_step(module, name)
        models.refuse_pruned(module, name)
        layers = decoders.decoder_spec(module)[0]
        plan = decoders.make_plan(compile_kwargs["method"], layers, compile_kwargs.get("layers"),
                                  compile_kwargs.get("keep"), options)
        return decoders.describe(module, plan)
    if _visual_only(compile_kwargs.get("method")):
        return compile(model, example_inputs, **compile_kwargs).report
    if not prunes(compile_kwargs.get("method") or DEFAULT_METHOD, compile_kwargs.get("layers")) \
            and compile_kwargs.get("recipe") is None:
        get_method(compile_kwargs.get("method") or DEFAULT_METHOD).resolve_options(parse_options(compile_kwargs.get("options")))
        load_kwargs = {k: compile_kwargs[k] for k in LOAD_KEYWORDS if k in compile_kwargs}
        module, inputs, name = _resolve(model, example_inputs, **load_kwargs)
        if vlm.is_vlm(module):
            if compile_kwargs.get("method") in methods_for(*VISUAL) or compile_kwargs.get("vision_layer") is not None:
                # no layers: pruned before the language model (a vision_layer alone: topk-cls, the default)
                settings = {k: v for k, v in compile_kwargs.items() if k not in LOAD_KEYWORDS}
                return compile(module, inputs, **settings).report
            return vlm.describe(module, inputs)
        if compile_kwargs.get("vision_layer") is not None:
            refuse_vision_layer(name)
        decoders.refuse_decode_step(module, name)
        decoders.refuse_encoder_method(module, name, compile_kwargs.get("method"))
        notes = [f"{name} was already pruned by tpc: the table shows the pruned program's layers, not the original "
                 "model's (inspect the original model with --layers/--keep to see the pruning)"] \
            if models.is_pruned(module) else []
        return describe_encoder(module, inputs, name, compile_kwargs.get("after") or "attention", notes)
    return compile(model, example_inputs, **compile_kwargs).report


def export(module: nn.Module, path: str | os.PathLike, example_inputs=None, check: bool = True, batch=None,
           precision: str = "fp32"):
    """Write ``module`` as an artifact chosen by the suffix of ``path`` (.onnx, .pt2, .plan).

    The artifact is checked against the torch module on the example inputs (batch 1 and the
    example batch) before it is renamed into place; a failure leaves no file behind. For a
    TensorRT ``.plan``, ``batch`` is the optimization profile "min,opt,max" and ``precision``
    one of fp32, fp16, bf16.
    """
    if isinstance(module, (vlm.VlmModule, decoders.DecodeModule)):
        return module.save(path, check=check)
    return write_artifact(module, Path(path), example_inputs, check=check, batch=batch, precision=precision)
