"""The backends a pruned model runs on, in one list; each command says which of them it runs."""

from __future__ import annotations

from tpc.errors import TpcError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(backend: str, runs: tuple[str, ...] = BACKENDS, what: str = "tpc") -> str:
    """``backend`` when ``what`` runs it; else one line naming the backends it does run."""
    if backend not in runs:
        known = "" if backend in BACKENDS else "unknown "
        raise TpcError(f"{known}backend {backend!r}: {what} runs {', '.join(runs)}"
                       + ("" if "tensorrt" in runs else " (a TensorRT engine: tpc compile -o model.plan)"))
    return backend
