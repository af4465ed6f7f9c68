"""Lowering to ONNX: standard ops only (opset 18), dynamic batch, checked, written atomically."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
import warnings

import onnx
import torch
from torch import fx, nn
from torch.onnx._internal.exporter import _core, _registration

from tpc.capture import export_program
from tpc.errors import TpcError, refusal_or_bug
from tpc.exports.atomic import atomic_output
from tpc.exports.checks import DECISIONS, CheckResult, check_artifact
from tpc.exports.onnx_ops import TRANSLATIONS
from tpc.exports.onnx_plugins import PLUGIN_TRANSLATIONS, plugin_reference_functions
from tpc.exports.onnxruntime import make_session

OPSET = 18
# An ONNX node's FX origin, "%name : [...] = call_function[target=torch.ops.tpc.kcenter.default](...)", when
# that FX node is a pruning decision (checks.DECISIONS).
_FX_DECISION = re.compile(r"^%(\S+) : .*\[target=torch\.ops\.(?:"
                          + "|".join(re.escape(str(op)) for op in DECISIONS) + r")\]")


def to_onnx(module: nn.Module, example_inputs: tuple, plugins: bool = False) -> onnx.ModelProto:
    """The module as an ONNX model with a dynamic batch dimension (tpc:: ops translated).

    With ``plugins``, the ops in ``onnx_plugins.PLUGIN_OPS`` stay single nodes in domain ``tpc`` for
    tpc's TensorRT plugins instead of being spelled out in standard ops.
    """
    ep = export_program(module, example_inputs, rewritten_by_tpc=True)  # a graph tpc captured (and rewrote)
    return program_to_onnx(ep, example_inputs, PLUGIN_TRANSLATIONS if plugins else TRANSLATIONS)


def program_to_onnx(ep: torch.export.ExportedProgram, example_inputs: tuple, table: dict) -> onnx.ModelProto:
    """An exported program as ONNX (opset 18), ``table`` translating its ``tpc::`` ops; one line
    when torch's exporter refuses (a failing tpc translation is reported as a bug)."""
    quiet = io.StringIO()
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        try:
            # torch.onnx.export(ep, dynamo=True, custom_translation_table=table) with the torchlib registry
            # built once per process (building it is about a second of every export)
            program = _core.export(ep, tuple(example_inputs), registry=_registry(table), dynamic_shapes={},
                                   opset_version=OPSET, optimize=True, report=False, verify=False, verbose=False)
        except Exception as err:  # an op without a translation refuses; a failing tpc translation is a bug
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise refusal_or_bug(err, f"ONNX export failed: {first}") from err
    model = program.model_proto
    model.producer_name = "tpc"
    return model


@functools.cache
def _torchlib_registry() -> _registration.ONNXRegistry:
    return _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)


def _registry(table: dict) -> _registration.ONNXRegistry:
    """The torchlib registry with ``table``'s translations of tpc:: ops added, on a copy (the
    exporter only reads it)."""
    registry = copy.copy(_torchlib_registry())
    registry.functions = {op: list(metas) for op, metas in registry.functions.items()}
    for op, translation in table.items():
        registry.register_op(op, translation, is_complex=False)
    return registry


def with_plugin_references(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an engine's ONNX that ONNX Runtime can run: tpc's plugin ops as standard-op functions."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.functions.extend(plugin_reference_functions())
    return copy


def decision_names(model: onnx.ModelProto) -> list[str]:
    """Names of the values holding each pruning step's kept indices, in graph order.

    Every ONNX node records the FX node it came from (``fx_node`` metadata); the last node made
    from a decision op's FX node produces its result, whatever name the optimizer left it.
    """
    last: dict[str, str] = {}
    for node in model.graph.node:
        fx_node = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        match = _FX_DECISION.match(fx_node)
        if match:
            last[match.group(1)] = node.output[0]
    return list(last.values())


KEPT = "tpc_kept_"


def with_decision_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the model with each pruning step's kept indices ([B, K] int64) as extra outputs
    ``tpc_kept_<i>`` after its own, and how many there are."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = decision_names(model)
    for i, name in enumerate(names):
        probe.graph.node.append(onnx.helper.make_node("Identity", [name], [f"{KEPT}{i}"], name=f"{KEPT}{i}"))
        probe.graph.output.append(onnx.helper.make_tensor_value_info(f"{KEPT}{i}", onnx.TensorProto.INT64, None))
    return probe, len(names)


def _uses_bfloat16(model: onnx.ModelProto) -> bool:
    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == bf16 for v in [*model.graph.input, *model.graph.output])


ONNX_LIMIT = 2**31  # a protobuf message above 2 GB cannot be serialized in one piece


def write_checked_onnx(model: onnx.ModelProto, path, what: str, gm: fx.GraphModule, inputs: list[tuple] | None,
                       compared=None) -> CheckResult | None:
    """Write ``model`` to ``path`` through a temporary file renamed into place once ``check_onnx`` against ``gm``
    on ``inputs`` passed (None: unchecked); ``what`` names the artifact in the size refusal ("the decode step")."""
    if model.ByteSize() >= ONNX_LIMIT:
        raise TpcError(f"{what} is {model.ByteSize() / 2**30:.1f} GB as ONNX, above the 2 GB a single ONNX file holds "
                       "(external weights are not written yet): write .pt2 instead")
    data = model.SerializeToString()
    with atomic_output(path, len(data)) as tmp:
        tmp.write_bytes(data)
        if inputs is None:
            return None
        with torch.no_grad():
            return check_onnx(onnx.load_from_string(data), gm, inputs, f"ONNX file {path.name}", compared=compared)


def check_onnx(model: onnx.ModelProto, gm: fx.GraphModule, inputs_list: list[tuple], what: str = "ONNX model",
               compared=None) -> CheckResult:
    """Run the model in ONNX Runtime on each input batch and compare with the torch graph
    (``compared``: which output elements to compare, see ``check_artifact``)."""
    probe, count = with_decision_outputs(model)
    try:
        session = make_session(probe.SerializeToString())
    except Exception as err:  # ONNX Runtime's own exception types
        if not _uses_bfloat16(model):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise TpcError(f"{what}: ONNX Runtime cannot run this bfloat16 model on the CPU ({first[:160]}); write it "
                       "unchecked with --no-check (check=False), or compile the model in float16 or float32") from err
    names = [i.name for i in session.get_inputs()]
    n_out = len(model.graph.output)

    def run(inputs):
        flat = [x for x in torch.utils._pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
        outs = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, flat)})
        decisions = [torch.from_numpy(d) for d in outs[n_out:]] if count else None
        return [torch.from_numpy(o) for o in outs[:n_out]], decisions

    return check_artifact(gm, run, inputs_list, what, compared=compared)
