"""An ONNX Runtime session wrapped as an ``nn.Module``: torch tensors in, torch tensors out."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


def make_session(model: bytes | str, threads: int | None = None, profile: str | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class OrtModule(nn.Module):
    """Runs an ONNX model in ONNX Runtime; behaves like the torch module it was exported from."""

    def __init__(self, model: bytes, threads: int | None = None, providers: list[str] | None = None, report=None):
        super().__init__()
        self.onnx_bytes = model
        self.session = make_session(model, threads, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.report = report

    def run(self, *args, extra_outputs: list[str] | None = None) -> list[np.ndarray]:
        feeds = {name: _numpy(a) for name, a in zip(self.input_names, args)}
        names = [o.name for o in self.session.get_outputs()]
        return self.session.run(names + list(extra_outputs or []), feeds)

    def forward(self, *args):
        outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.run(*args)]
        return outs[0] if len(outs) == 1 else tuple(outs)
