"""``tpc eval``: accuracy of one or several pruning budgets against the unpruned model."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import tpc
from tpc import models
from tpc.api import prunes
from tpc.backends import check_backend
from tpc.capture import capture
from tpc.commands.arguments import load_kwargs, prune_kwargs
from tpc.dataset import accuracy, check_data_path, load_dataset, parse_floats, predict, warn_if_labels_look_meaningless
from tpc.decode.capture import refuse_encoder_method
from tpc.errors import TpcError
from tpc.exports import to_onnxruntime
from tpc.exports.atomic import check_output_path, refuse_overwriting
from tpc.flops import count_flops
from tpc.plot import accuracy_vs_flops
from tpc.registry import DEFAULT_METHOD
from tpc.vlm.family import refuse_vlm

@dataclass
class EvalRow:
    config: str
    method: str | None
    keep: str | None
    gflops: float
    flops_ratio: float
    top1: float | None
    agreement: float


@dataclass
class EvalResult:
    model: str
    data: str
    images: int
    rows: list[EvalRow] = field(default_factory=list)
    plot: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.model} on {self.images} images of {self.data}",
                 f"{'config':<40} {'GFLOPs':>8} {'ratio':>6} {'top-1':>7} {'agree':>7}"]
        for r in self.rows:
            top1 = f"{100 * r.top1:6.2f}%" if r.top1 is not None else "      -"
            lines.append(f"{r.config:<40} {r.gflops:8.4f} {r.flops_ratio:6.3f} {top1} {100 * r.agreement:6.2f}%")
        return "\n".join(lines)


def parse_sweep(text: str | None) -> list[str] | None:
    """--sweep keep=V1,V2,... as the keep values."""
    if text is None:
        return None
    key, _, values = text.partition("=")
    if key.strip() != "keep" or not values:
        raise TpcError(f"--sweep takes keep=V1,V2,... (e.g. keep=0.9,0.8,0.7), not {text!r}")
    return [v.strip() for v in values.split(",") if v.strip()]


def run(args) -> int:
    result = run_eval(args.model, data=args.data, method=args.method, layers=args.layers, keep=args.keep,
                      sweep=parse_sweep(args.sweep), mean=args.mean, std=args.std, backend=args.backend,
                      batch=args.batch, offset=args.offset, limit=args.limit, plot=args.plot,
                      load_kwargs=load_kwargs(args), compile_kwargs=prune_kwargs(args), progress=args.progress)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.table())
        if result.plot:
            print(f"wrote {result.plot}")
    return 0


def _runner(module, backend: str, example_inputs=None):
    if backend == "torch":
        return module
    return to_onnxruntime(module, example_inputs)


def run_eval(model_id, data, method=DEFAULT_METHOD, layers=None, keep=None, sweep=None, mean=None, std=None,
             backend="torch", batch=500, offset=0, limit=None, plot=None, load_kwargs=None, compile_kwargs=None,
             progress=None) -> EvalResult:
    check_backend(backend, ("torch", "onnxruntime"), "tpc eval")
    if batch < 1:
        raise TpcError("--batch must be at least 1")
    if offset < 0 or (limit is not None and limit < 1):
        raise TpcError("--offset is 0 or more and --limit 1 or more")
    check_data_path(data)  # before loading the model: a typo should not cost a model load
    if sweep and plot is None:
        plot = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model_id)).stem) + "_sweep.png"
    if plot:
        check_output_path(plot, "--plot")
        refuse_overwriting([("--plot", plot)], [("the model you evaluate", model_id), ("the --data file", data),
                                                ("the --weights file", (load_kwargs or {}).get("weights"))])
    user_mean, user_std = parse_floats(mean, "mean"), parse_floats(std, "std")
    loaded = models.load(str(model_id), **(load_kwargs or {}))
    refuse_vlm(loaded.module, "eval")
    refuse_encoder_method(loaded.module, loaded.name, method)
    if prunes(method, layers):  # an artifact tpc wrote may be evaluated as it is, not pruned again
        models.refuse_pruned(loaded.module, loaded.name)
    mean, std = user_mean or loaded.mean, user_std or loaded.std
    if mean is None or std is None:
        raise TpcError(f"{loaded.name} has no normalisation in its config: pass --mean and --std")
    channels = loaded.input_size[0]
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise TpcError(f"{flag} has {len(values)} values but the model's images have {channels} channels: "
                           f"give one value or {channels}")
    dataset = load_dataset(data, loaded.input_size)
    total = len(dataset.images)
    if total == 0:
        raise TpcError(f"{data} holds no images")
    if offset >= total:
        raise TpcError(f"--offset {offset} skips all {total} images of {data}")
    end = None if limit is None else offset + limit
    dataset.images = dataset.images[offset:end]
    dataset.labels = None if dataset.labels is None else dataset.labels[offset:end]

    base_flops = count_flops(capture(loaded.module, loaded.example_inputs)).total
    with torch.no_grad():
        out = loaded.module(*loaded.example_inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    warn_if_labels_look_meaningless(dataset.labels, torch.as_tensor(out).shape[-1])
    ref = predict(_runner(loaded.module, backend, loaded.example_inputs), dataset, mean, std, batch, "unpruned", progress)
    result = EvalResult(loaded.name, str(data), len(dataset.images))
    result.rows.append(EvalRow("unpruned", None, None, base_flops / 1e9, 1.0, *asdict(accuracy(ref, ref, dataset.labels)).values()))
    if prunes(method, layers):
        for k in sweep or [keep]:
            pm = tpc.compile(loaded.module, loaded.example_inputs, method=method, layers=layers, keep=k,
                             **(compile_kwargs or {}))
            label = pm.report.recipe()
            preds = predict(_runner(pm, backend), dataset, mean, std, batch, label, progress)
            acc = accuracy(preds, ref, dataset.labels)
            result.rows.append(EvalRow(label, method, str(k) if k is not None else ",".join(pm.report.keep), pm.report.flops_after / 1e9, pm.report.flops_ratio, acc.top1, acc.agreement))
    if plot:
        base = asdict(result.rows[0])
        metric = "top1" if dataset.labels is not None else "agreement"
        accuracy_vs_flops([asdict(r) for r in result.rows[1:]], plot, f"{loaded.name}: {metric} vs FLOPs", base, metric)
        result.plot = str(plot)
    return result
