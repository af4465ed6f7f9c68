"""Capture a model as an aten graph with ``torch.export``, batch dimension dynamic.

Every artifact tpc writes accepts any batch size, so capture marks dim 0 of every tensor
input dynamic. Token inputs (integer or bool tensors of rank 2: ``input_ids``,
``attention_mask``, ``token_type_ids``) also get a dynamic sequence length (dim 1) unless
``dynamic_length=False``: ``Dim.AUTO`` lets torch.export keep the length symbolic where the
model allows it (bounded by its position table) and fixed where the model fixes it. Images
keep their fixed size. The graph is captured in inference mode (eval) without touching the
caller's module: training flags are set on the way in and restored on the way out.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from tpc.errors import REPORT, TpcError, TpcInternalError, refusal_or_bug
from tpc.graph.einsum import einsum_to_matmul

MAX_BATCH = 65536


def set_eval(model: nn.Module) -> None:
    """Eval mode for every submodule (not ``model.eval()``: exported GraphModules refuse it)."""
    for m in model.modules():
        m.training = False


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode for the duration, then restore each flag as it was."""
    flags = {m: m.training for m in model.modules()}
    try:
        set_eval(model)
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def is_token_input(x) -> bool:
    """Token ids or a padding mask: an integer or bool tensor [B, N] whose dim 1 is the sequence."""
    return isinstance(x, torch.Tensor) and x.dim() == 2 and not x.dtype.is_floating_point and not x.dtype.is_complex


def dynamic_batch_shapes(example_inputs: tuple, example_kwargs: dict | None = None, batch=None,
                         dynamic_length: bool = False):
    batch = batch or Dim("batch", min=1, max=MAX_BATCH)

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        return {0: batch, 1: Dim.AUTO} if dynamic_length and is_token_input(x) else {0: batch}

    args = tuple(spec(x) for x in example_inputs)
    if example_kwargs:
        return args, {k: spec(v) for k, v in example_kwargs.items()}
    return args, None


def export_program(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
                   dynamic_length: bool = True, rewritten_by_tpc: bool = False) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch (and sequence length of token inputs, see the module
    docstring); one clear error when the model cannot be captured.

    The batch range is 1..MAX_BATCH unless the model itself bounds it (a loaded .pt2 keeps
    the range it was exported with): then the range torch.export infers is taken.
    ``rewritten_by_tpc``: ``model`` is tpc's rewrite of a graph torch.export already captured,
    so a failure is tpc's bug (``TpcInternalError``), whoever's frame raised it.
    """
    last = None
    for batch in (None, Dim.DYNAMIC):
        args_spec, kwargs_spec = dynamic_batch_shapes(example_inputs, example_kwargs, batch, dynamic_length)
        if _variadic(model):
            args_spec = (args_spec,)  # forward(self, *xs): one spec for the whole tuple
        dynamic_shapes = args_spec if kwargs_spec is None else {**_by_position(model, args_spec), **kwargs_spec}
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or None,
                                           dynamic_shapes=dynamic_shapes)
            except Exception as err:  # torch.export raises many types; the user needs one line
                last = err
                if "Constraints violated" not in str(err):
                    break
    first = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    if rewritten_by_tpc and not isinstance(last, TpcError):
        raise TpcInternalError(f"internal error: torch.export could not re-export tpc's rewritten graph: "
                               f"{type(last).__name__}: {first}; {REPORT}") from last
    if "DynamicCache" in first:  # a transformers decoder called with its default use_cache=True
        first = ("it returns its KV cache (a transformers DynamicCache), which torch.export cannot take as an output: "
                 "wrap it to call it with use_cache=False and return its hidden states (a decoder-only LM's decoding is "
                 "pruned by a decode-time method, docs/decode.md)")
    raise refusal_or_bug(last, f"torch.export could not capture {type(model).__name__} with a dynamic batch: {first}") from last


def _variadic(model: nn.Module) -> bool:
    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    return bool(kinds) and kinds[0] is inspect.Parameter.VAR_POSITIONAL


def _by_position(model: nn.Module, args_spec: tuple) -> dict:
    names = [p for p in inspect.signature(model.forward).parameters]
    return dict(zip(names, args_spec))


def capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
            dynamic_length: bool = True) -> fx.GraphModule:
    """The model as a GraphModule of aten ops with ``meta['val']`` on every node."""
    if example_inputs and isinstance(example_inputs[0], torch.Tensor) and example_inputs[0].shape[0] < 2:
        raise TpcError("example inputs need a batch of at least 2 so the batch dimension is captured as dynamic")
    gm = export_program(model, example_inputs, example_kwargs, dynamic_length).module()
    einsum_to_matmul(gm)
    return gm


def length_span(lengths: tuple[int, int | None]) -> str:
    """``(2, 128)`` -> "2-128", ``(2, None)`` -> "2 or more"."""
    return f"{lengths[0]} or more" if lengths[1] is None else f"{lengths[0]}-{lengths[1]}"


def length_range(gm: fx.GraphModule) -> tuple[int, int] | None:
    """(min, max) of the graph's symbolic sequence length (dim 1 of a token input), None when fixed."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if is_token_input(value) and not isinstance(value.shape[1], int):
            size = value.shape[1]
            ranges = size.node.shape_env.var_to_range.get(size.node.expr)
            low = int(ranges.lower) if ranges is not None else 2
            bounded = ranges is not None and ranges.upper.is_finite and ranges.upper != int_oo  # int_oo says finite
            high = int(ranges.upper) if bounded else None
            return low, high
    return None
