"""A Triton Inference Server model repository from an ONNX artifact.

``DIR/NAME/config.pbtxt`` declares the artifact's inputs and outputs (names, Triton dtypes,
dims without the batch axis, ``-1`` where the artifact's size is symbolic), ``max_batch_size``,
``dynamic_batching`` and one CPU ``instance_group``; ``DIR/NAME/1/`` holds ``model.onnx`` and,
for the ``python`` backend, ``model.py`` (``triton_model.py``: ONNX Runtime inside the
server's Python stub, the flavour the server bundled by ``nvidia-pytriton`` runs). The
``onnxruntime`` flavour is the standard one for a full Triton installation or container.
The model folder is built beside its target and renamed into place: a failed export leaves
nothing, and an existing folder is never replaced.
"""

from __future__ import annotations

import errno
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from tpc.errors import TpcError
from tpc.exports.atomic import disk_full

BACKENDS = ("onnxruntime", "python")
MODEL_PY = Path(__file__).with_name("triton_model.py")
QUEUE_DELAY_US = 500  # how long the dynamic batcher waits for more requests to join a batch

# ONNX TensorProto element type -> Triton's data type
TRITON_DTYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, Triton dtype, and dims after the batch axis (-1: any size)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def _tensor(value: onnx.ValueInfoProto, artifact: Path) -> Tensor:
    kind = value.type.tensor_type
    if not value.type.HasField("tensor_type") or kind.elem_type not in TRITON_DTYPES:
        raise TpcError(f"{artifact}: {value.name!r} is not a tensor of a type Triton serves")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    if not dims or dims[0] != -1:
        raise TpcError(f"{artifact}: {value.name!r} has no dynamic batch axis (shape {dims}); "
                       "compile it again with tpc (its artifacts take any batch size)")
    return Tensor(value.name, TRITON_DTYPES[kind.elem_type], tuple(dims[1:]))


def signature(artifact: str | Path) -> Signature:
    """The served inputs and outputs of an ONNX artifact, read from its graph (weights not loaded)."""
    artifact = Path(artifact)
    if artifact.suffix.lower() != ".onnx":
        raise TpcError(f"{str(artifact)!r} is not an ONNX artifact: serve a model compiled with `tpc compile … -o "
                       "model.onnx`")
    if not artifact.is_file():
        raise TpcError(f"artifact {str(artifact)!r} does not exist")
    try:
        model = onnx.load(artifact, load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf says DecodeError or others
        raise TpcError(f"{artifact} is not a readable ONNX file ({type(err).__name__}): compile it again") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise TpcError(f"{artifact} keeps its weights in external files: serve a single-file ONNX artifact")
    graph_inputs = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor(v, artifact) for v in model.graph.input if v.name not in graph_inputs)
    if not inputs or not model.graph.output:  # an empty file parses as an empty model
        raise TpcError(f"{artifact} is not a readable ONNX file (it holds no graph with inputs and outputs"
                       f"{', it is empty' if artifact.stat().st_size == 0 else ''}): compile it again")
    return Signature(inputs, tuple(_tensor(v, artifact) for v in model.graph.output))


def _tensor_config(kind: str, tensors: tuple[Tensor, ...]) -> str:
    items = ",\n".join(f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n    dims: [ {", ".join(map(str, t.dims))} ]\n  }}'
                       for t in tensors)
    return f"{kind} [\n{items}\n]\n"


def config_text(sig: Signature, name: str, backend: str, max_batch: int, queue_delay_us: int = QUEUE_DELAY_US) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ModelConfig) for ``sig``."""
    kind = 'backend: "python"' if backend == "python" else 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"'
    return (f'name: "{name}"\n{kind}\nmax_batch_size: {max_batch}\n'
            + _tensor_config("input", sig.inputs) + _tensor_config("output", sig.outputs)
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise TpcError(f"--name {name!r}: a model name is letters, digits, '_', '.' and '-'")
    return name


def write_repository(artifact: str | Path, repo: str | Path, name: str | None = None, backend: str = "onnxruntime",
                     max_batch: int = 32, queue_delay_us: int = QUEUE_DELAY_US) -> Path:
    """Write ``repo/name/`` (config.pbtxt, 1/model.onnx, and 1/model.py for ``python``); returns that folder.

    ``queue_delay_us`` is Triton's ``max_queue_delay_microseconds``: how long the dynamic batcher
    holds a request for others to join it (longer: bigger batches, more latency)."""
    artifact, repo = Path(artifact), Path(repo)
    if backend not in BACKENDS:
        raise TpcError(f"unknown Triton backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if max_batch < 1:
        raise TpcError(f"--max-batch {max_batch}: the largest batch the server forms must be at least 1")
    if queue_delay_us < 0:
        raise TpcError(f"queue delay {queue_delay_us} µs: the dynamic batcher's wait cannot be negative")
    name = check_name(name or artifact.stem)
    sig = signature(artifact)
    if repo.exists() and not repo.is_dir():
        raise TpcError(f"--triton-repo {str(repo)!r} is a file: give a folder (new or a model repository)")
    if not repo.parent.is_dir():
        raise TpcError(f"the folder {str(repo.parent)!r} that --triton-repo names does not exist: create it first")
    target = repo / name
    if target.exists():
        raise TpcError(f"{str(target)!r} already exists: remove it, or give another --name or --triton-repo")
    created = not repo.exists()
    try:
        repo.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repo))
    except OSError as err:
        raise TpcError(f"cannot write the model repository {str(repo)!r}: {err.strerror}") from None
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(artifact, tmp / "1" / "model.onnx")
        if backend == "python":
            shutil.copyfile(MODEL_PY, tmp / "1" / "model.py")
        (tmp / "config.pbtxt").write_text(config_text(sig, name, backend, max_batch, queue_delay_us))
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(target, artifact.stat().st_size) from None
        if isinstance(err, OSError):
            raise TpcError(f"cannot write the model repository {str(target)!r}: {err.strerror}") from None
        raise
    return target
