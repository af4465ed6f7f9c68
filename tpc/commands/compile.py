"""``tpc compile``: prune a model and write a checked artifact (.onnx, .pt2, .plan)."""

from __future__ import annotations

import time
from pathlib import Path

import tpc
from tpc import decode
from tpc.capture import length_range, length_span
from tpc.commands.arguments import compile_kwargs, describe_model
from tpc.compiled import recipe
from tpc.decode import DecodeModule
from tpc.decode.export import check_step_suffix
from tpc.errors import TpcError
from tpc.exports import check_target
from tpc.exports.atomic import check_output_path, refuse_overwriting
from tpc.vlm import VlmModule
from tpc.vlm.module import refuse_cache_artifact, step_path
from tpc.vlm.family import names_a_vlm


def run(args) -> int:
    out = Path(args.output)
    decode.refuse_kv_artifact(args.method)
    refuse_cache_artifact(args.decode)
    if out.suffix.lower() == ".plan" and names_a_vlm(args.model):
        raise TpcError(f"{args.model} is a vision-language model: TensorRT engines are written for encoders only; "
                       "write its pruned prefill as .pt2 or .onnx")
    if decode.decode_time(args.method):
        check_step_suffix(out, args.method)
    check_target(out, args.batch, args.precision)
    outputs = [("-o", out)] + ([("the decode step written beside -o", step_path(out))] if args.decode else [])
    if args.decode:
        check_output_path(step_path(out))
    refuse_overwriting(outputs, [("the model you compile", args.model), ("the --weights file", args.weights),
                                 ("the --recipe file", args.recipe)])
    start = time.perf_counter()
    pruned = tpc.compile(args.model, **compile_kwargs(args))
    report = pruned.report
    decoder = isinstance(pruned, DecodeModule)
    print(f"{describe_model(args)}: {report.summary() if decoder else recipe(report)}")
    print(report.table())
    if not decoder:
        print(report.summary())
    result = tpc.export(pruned, out, check=not args.no_check, batch=args.batch, precision=args.precision)
    took = time.perf_counter() - start
    kind = {".onnx": "ONNX opset 18, standard ops", ".pt2": "torch.export program",
            ".plan": f"TensorRT engine, {args.precision}"}[out.suffix.lower()]
    dynamic = "dynamic batch and prompt length" if isinstance(pruned, VlmModule) else \
        "the decode step, dynamic batch and cache length" if decoder else "dynamic batch"
    lengths = None if decoder or isinstance(pruned, VlmModule) else length_range(pruned.graph_module)
    if lengths is not None:
        dynamic += f" and length ({length_span(lengths)} tokens)"
    print(f"wrote {out} in {took:.1f} s: {kind}, {dynamic}")
    if isinstance(pruned, VlmModule) and pruned.decoder is not None:
        print(f"wrote {step_path(out)}: torch.export program, the language model's sparse decode step, dynamic batch "
              f"and cache length{'' if args.no_check else ', checked against the torch step before it was renamed'}")
    if result:
        flips = f", {result.tie_flips} near-tie decision(s) resolved differently" if result.tie_flips else ""
        print(f"checked against the torch module {result.where()}: "
              f"max abs error {result.max_abs_error:.2g}{flips}")
    return 0
