"""Load a ``.pt2`` (``torch.export``) archive without executing code hidden in it.

``torch.export.load`` unpickles some payloads with ``weights_only=False`` (tensors marked
``use_pickle``, custom and opaque objects, example inputs when a safe load fails) and loads
AOTInductor shared libraries; any of these runs whatever the file's author put there. So:

1. members that can only be loaded by running their code (AOTInductor/ExecuTorch binaries,
   custom and opaque objects) and tensors stored as pickles refuse the archive, in one line;
2. what is left is loaded with every ``torch.load`` forced to ``weights_only=True``
   (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so a pickle that still holds more than tensors fails
   to load instead of running.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path

import torch

from tpc.errors import REPORT, TpcError, TpcInternalError

CODE_MEMBERS = {
    "data/aotinductor/": "an AOTInductor shared library",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia": "an MTIA binary",
    "data/constants/custom_obj_": "a pickled custom object",
    "data/constants/opaque_obj_": "a pickled opaque object",
}
_env_lock = threading.Lock()


def _inner(name: str) -> str:
    """The member's path below the archive's root folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _refusal(names: list[str], read) -> str | None:
    for name in names:
        inner = _inner(name)
        for prefix, what in CODE_MEMBERS.items():
            if inner.startswith(prefix):
                return f"it holds {what} ({name}), which loading would execute"
        if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith("_config.json"):
            try:
                config = json.loads(read(name)).get("config", {})
            except (ValueError, AttributeError):
                return f"its payload table {name} is not valid JSON"
            pickled = [fqn for fqn, meta in config.items() if isinstance(meta, dict) and meta.get("use_pickle")]
            if pickled:
                return (f"{len(pickled)} of its tensors (e.g. {pickled[0]!r}) are stored as pickles, which loading "
                        "would execute; save the program from plain tensors")
    return None


@contextlib.contextmanager
def _weights_only_loads():
    with _env_lock:
        saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def load_program(path: str | os.PathLike, written_by_tpc: bool = False) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` in ``path``; a ``TpcError`` (one line) for a file tpc will not load.

    ``written_by_tpc``: the file is the artifact tpc just wrote (checked before it is kept), so
    failing to load it is tpc's bug, raised as ``TpcInternalError``.
    """
    path = Path(path)

    def refuse(message: str, cause: BaseException | None = None) -> Exception:
        if not written_by_tpc:
            return TpcError(message)
        return TpcInternalError(f"internal error: tpc cannot load the program it wrote: {message}"
                                + (f" ({type(cause).__name__})" if cause is not None else "") + f"; {REPORT}")

    if not path.is_file():
        raise refuse(f"model file {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            why = _refusal(archive.namelist(), archive.read)
    except (zipfile.BadZipFile, OSError) as err:
        raise refuse(f"cannot load {str(path)!r}: not a torch.export archive ({err})", err) from err
    if why:
        raise refuse(f"refusing to load {str(path)!r}: {why}")
    import tpc.kernels  # noqa: F401  (a .pt2 written by tpc holds tpc:: ops)

    try:
        with _weights_only_loads():
            return torch.export.load(str(path))
    except pickle.UnpicklingError as err:
        raise refuse(f"refusing to load {str(path)!r}: it holds pickled objects other than tensors, "
                     "which loading would execute", err) from (err if written_by_tpc else None)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise refuse(f"cannot load {str(path)!r} as a torch.export program: {first}", err) from (err if written_by_tpc else None)
