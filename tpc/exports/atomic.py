"""Atomic artifact writes: a temp file beside the target, checked, then renamed over it.

A failed compile leaves no partial file and never touches an existing one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from tpc.errors import TpcError


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when the artifact could not be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TpcError(f"output directory {str(parent)!r} does not exist: create it or choose another -o path")
    if path.is_dir():
        raise TpcError(f"output path {str(path)!r} is a directory: give a file name such as model.onnx")
    if not os.access(parent, os.W_OK):
        raise TpcError(f"output directory {str(parent)!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yields a temp path in the target's directory; renames it over ``path`` only on success."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
