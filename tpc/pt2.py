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
import hashlib
import io
import json
import os
import pickle
import struct
import threading
import zipfile
from pathlib import Path

import torch

import tpc.kernels  # noqa: F401  (a .pt2 written by tpc holds tpc:: ops)
from tpc.errors import REPORT, TpcError, TpcInternalError, check_readable

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


EXPANSION_LIMIT = 100  # torch.export.save stores members uncompressed; zeros deflate about 1000 times


def _odd_member(info: zipfile.ZipInfo) -> str | None:
    """A member torch.export.save never writes: a path leaving the archive, or a compressed bomb."""
    parts = info.filename.replace("\\", "/").split("/")
    if info.filename.startswith("/") or ".." in parts:
        return f"its member {info.filename!r} points outside the archive"
    if info.file_size > 2**20 and info.file_size > EXPANSION_LIMIT * max(info.compress_size, 1):
        return (f"its member {info.filename!r} expands from {info.compress_size:,} to {info.file_size:,} bytes "
                "(torch.export.save stores members uncompressed)")
    return None


def _refusal(infos: list[zipfile.ZipInfo], read) -> str | None:
    odd = next(filter(None, map(_odd_member, infos)), None)
    if odd:
        return f"{odd}: not an archive torch.export.save wrote"
    for name in (info.filename for info in infos):
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

    try:
        check_readable(path, "model file", "a .pt2 file written by torch.export.save")
    except TpcError as err:
        raise refuse(str(err)) from None
    try:
        with zipfile.ZipFile(path) as archive:
            why = _refusal(archive.infolist(), archive.read)
    except (zipfile.BadZipFile, OSError) as err:
        raise refuse(f"cannot load {str(path)!r}: not a torch.export archive ({err})", err) from err
    if why:
        raise refuse(f"refusing to load {str(path)!r}: {why}")
    try:
        with _weights_only_loads():
            return torch.export.load(str(path))
    except pickle.UnpicklingError as err:
        raise refuse(f"refusing to load {str(path)!r}: it holds pickled objects other than tensors, "
                     "which loading would execute", err) from (err if written_by_tpc else None)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise refuse(f"cannot load {str(path)!r} as a torch.export program: {first}", err) from (err if written_by_tpc else None)


SERIALIZATION_ID = ".data/serialization_id"


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """``program`` as ``.pt2`` bytes that depend only on the program: the same model and settings
    give the same file in every process, as users diffing, caching or signing artifacts need.

    ``torch.export.save`` writes two things that differ from run to run: each node's ``from_node``
    provenance (which holds ``graph_id``, a memory address) and ``.data/serialization_id`` (random).
    Provenance is dropped (it is for debugging the tracer, not for running the program); the id
    becomes a digest of the archive's other bytes, which is what a serialization id identifies.
    """
    for module in program.graph_module.modules():
        if isinstance(getattr(module, "graph", None), torch.fx.Graph):
            for node in module.graph.nodes:
                node.meta.pop("from_node", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return _fixed_serialization_id(buffer.getvalue())


def _fixed_serialization_id(data: bytes) -> bytes:
    """``data`` with its ``serialization_id`` member replaced in place by a digest of everything
    else: the archive without the old id and without the CRC-32 fields that hold its checksum."""
    places = _member_places(data, SERIALIZATION_ID)
    if places is None:
        return data
    begin, end, crcs = places
    rest = bytearray(data)
    for at in crcs:
        rest[at:at + 4] = bytes(4)
    digest = hashlib.sha256(bytes(rest[:begin]) + bytes(rest[end:])).digest()
    size = end - begin
    return replace_member(data, SERIALIZATION_ID, str(int.from_bytes(digest, "big") % 10 ** size).zfill(size).encode())


def replace_member(data: bytes, name: str, content: bytes) -> bytes:
    """``data`` with its stored member ``name`` (below the archive's top folder) holding ``content``
    instead, of the same length; its CRC-32 rewritten wherever the zip keeps it."""
    places = _member_places(data, name)
    if places is None or len(content) != places[1] - places[0]:
        raise ValueError(f"{name}: only a stored member's bytes can be replaced, by as many bytes")
    begin, end, crcs = places
    out = bytearray(data)
    out[begin:end] = content
    for at in crcs:
        out[at:at + 4] = struct.pack("<I", zipfile.crc32(content))
    return bytes(out)


def _member_places(data: bytes, name: str) -> tuple[int, int, list[int]] | None:
    """Where the stored member ``name``'s bytes begin and end in ``data``, and the offsets of its
    CRC-32 fields (the local header's, or the data descriptor's after a streamed member, and the
    central directory's); None when the archive holds no such stored member."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos, at = archive.infolist(), archive.start_dir
    info = next((i for i in infos if _inner(i.filename) == name), None)
    if info is None or info.compress_type != zipfile.ZIP_STORED:
        return None
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    begin = info.header_offset + 30 + name_len + extra_len
    end = begin + info.file_size
    if info.flag_bits & 0x08:  # the CRC follows the data, after an optional descriptor signature
        crcs = [end + 4 if data[end:end + 4] == b"PK\x07\x08" else end]
    else:
        crcs = [info.header_offset + 14]
    for entry in infos:  # central directory headers, in the order they were read
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        if entry is info:
            crcs.append(at + 16)
        at += 46 + n + m + k
    return begin, end, crcs
