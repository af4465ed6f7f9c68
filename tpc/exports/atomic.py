"""Atomic artifact writes: a temp file beside the target, checked, then renamed over it.

A failed or interrupted compile leaves no partial file and never touches an existing one.
The file gets the permissions a plain ``open(path, "w")`` would give (the umask's), or those
of the file it replaces; a symlink is written through to its target, as ``cp`` does. A full
disk is one ``TpcError`` naming the filesystem and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

from tpc.errors import TpcError

_umask_lock = threading.Lock()


def check_output_path(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Fail early, before any work, when the artifact could not be written (at a symlink's target: the
    bytes go there). Returns ``path``."""
    given = Path(path)
    path = write_target(given)
    if path.is_dir():
        raise TpcError(f"{flag} {str(path)!r} is a directory: give a file name inside it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TpcError(f"output directory {str(parent)!r} of {flag} does not exist: create it or choose another {flag} path")
    if not os.access(parent, os.W_OK):
        raise TpcError(f"output directory {str(parent)!r} of {flag} is not writable")
    if os.statvfs(parent).f_blocks == 0:  # /proc, /sys: a kernel's view, no room for files
        raise TpcError(f"output directory {str(parent)!r} of {flag} is on a virtual filesystem "
                       f"({str(_mount_point(parent))!r}) that holds no files: choose another {flag} path")
    return given


def refuse_overwriting(outputs, inputs) -> None:
    """Every output path against every input path and against each other, before any work: a command
    never writes over a file it reads (the model, its weights, the data) or over another of its outputs.

    ``outputs`` and ``inputs``: (flag or description, path or None) pairs."""
    def same(a, b) -> bool:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)  # hard links

    written = []
    for flag, path in outputs:
        if not path:
            continue
        for what, given in inputs:
            if given and isinstance(given, (str, os.PathLike)) and same(path, given):
                raise TpcError(f"{flag} {str(path)!r} is {what}: writing there would overwrite it; choose another "
                               f"{flag} path")
        for other, earlier in written:
            if same(path, earlier):
                raise TpcError(f"{flag} {str(path)!r} is also {other}: give each output its own path")
        written.append((flag, path))


def write_target(path: Path) -> Path:
    """Where the bytes go: a symlink's target (followed through every link), else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _umask() -> int:
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(target: Path) -> int:
    """The replaced file's mode, or what ``open(target, "w")`` would create under the umask."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full(target: Path, needed: int | None) -> TpcError:
    parent = target.parent if str(target.parent) else Path(".")
    free = shutil.disk_usage(parent).free
    need = f"needs {needed:,} bytes" if needed else "needs more space"
    return TpcError(f"no space left on the filesystem at {str(_mount_point(parent))!r} for {str(target)!r}: "
                    f"the artifact {need}, {free:,} are free; free some space or write elsewhere")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, size: int | None = None):
    """Yields a temp path in the target's directory; renames it over ``path`` only on success.

    ``size`` (bytes, when known) is checked against the free space before anything is written.
    """
    target = check_output_path(write_target(Path(path)))
    parent = target.parent if str(target.parent) else Path(".")
    if size is not None and shutil.disk_usage(parent).free < size:
        raise disk_full(target, size)
    mode = new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.partial-", suffix=target.suffix, dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(target, size) from None
        raise


@contextlib.contextmanager
def kept_on_failure(path: str | os.PathLike):
    """The file at ``path`` (a symlink's target) as it was, should the block fail or be interrupted: for a
    command writing several artifacts, each atomically, whose later failure must undo an earlier one. The
    old file is held under a second name beside it (a hard link, a copy where the filesystem has none)
    until the block ends; a file the block created where there was none is removed."""
    target = write_target(Path(path))
    held = None
    if target.is_file():
        parent = target.parent if str(target.parent) else Path(".")
        fd, name = tempfile.mkstemp(prefix=f".{target.stem}.old-", suffix=target.suffix, dir=parent)
        os.close(fd)
        held = Path(name)
        try:
            held.unlink()
            os.link(target, held)
        except OSError:
            shutil.copy2(target, held)
    try:
        yield
    except BaseException:
        if held is not None:
            os.replace(held, target)
        else:
            target.unlink(missing_ok=True)
        raise
    if held is not None:
        held.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written atomically to ``path`` (see :func:`atomic_output`)."""
    with atomic_output(path, len(data)) as tmp:
        tmp.write_bytes(data)
