"""``tpc export``: a Triton Inference Server model repository for an ONNX artifact (:mod:`tpc.serving.repository`)."""

from __future__ import annotations

from tpc.serving.repository import signature, write_repository


def run(args) -> int:
    folder = write_repository(args.artifact, args.triton_repo, args.name, backend=args.backend, max_batch=args.max_batch)
    sig = signature(folder / "1" / "model.onnx")
    print(f"wrote {folder}: config.pbtxt and 1/{'model.onnx, 1/model.py' if args.backend == 'python' else 'model.onnx'}"
          f" ({args.backend} backend, max batch {args.max_batch}, dynamic batching)")
    print(f"inputs {_tensors(sig.inputs)} -> outputs {_tensors(sig.outputs)}")
    return 0


def _tensors(tensors) -> str:
    return ", ".join(f"{t.name} {t.dtype.removeprefix('TYPE_')} [-1, {', '.join(map(str, t.dims))}]" for t in tensors)
