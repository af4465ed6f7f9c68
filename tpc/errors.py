"""The error types: refusals the user can act on, and tpc's own bugs.

A ``TpcError`` carries a message meant to be printed as a single line: what was wrong and
what to do instead. The CLI prints it without a traceback and exits non-zero. Anything else
raised inside tpc is a bug in tpc; the pass manager reports it as a ``TpcInternalError``
(which is deliberately not a ``TpcError``), naming the pass and the node it was at.
"""

import os
import sys
from pathlib import Path

REPORT = "this is a bug in tpc, not a problem with your model: please report it with the command and the " \
         "traceback (rerun with --debug, or catch TpcInternalError)"


class TpcError(Exception):
    """A user-facing failure: bad input, an unsupported model, or a graph tpc refuses."""


def check_readable(path, what: str, expect: str, directory: bool = False):
    """``path`` (a ``Path``) when this process can read it; else one line saying why (it does not
    exist, is a directory where a file is wanted, or reading it is not permitted) and ``expect``."""
    path = Path(path)
    if not path.exists():
        raise TpcError(f"{what} {str(path)!r} does not exist: give {expect}")
    if path.is_dir() and not directory:
        raise TpcError(f"{what} {str(path)!r} is a directory: give {expect}")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise TpcError(f"{what} {str(path)!r} cannot be read: permission denied (check its permissions)") from None
    except OSError as err:
        raise TpcError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    return path


class TpcInternalError(RuntimeError):
    """A bug inside tpc: the pass (and node) where it happened; the original exception is its cause."""


# Code that runs under tpc's calls (torch.export, torch.onnx, ONNX Runtime, Triton, TensorRT, loading weights,
# images and plots) but is neither tpc's nor the model's.
_TOOLING = frozenset({"torch", "functorch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "sympy", "numpy",
                      "typing_extensions", "optree", "ml_dtypes", "google", "triton", "tensorrt", "safetensors",
                      "huggingface_hub", "filelock", "fsspec", "jinja2", "networkx", "packaging", "PIL", "matplotlib"})


def _innermost_author(tb) -> str | None:
    """The top-level package of the innermost frame in ``tb`` written for this model: tpc's code,
    or the model's (its own file, timm, transformers), skipping Python and torch/ONNX tooling."""
    author = None
    while tb is not None:
        package = (tb.tb_frame.f_globals.get("__name__") or "").split(".")[0]
        if package not in sys.stdlib_module_names and package not in _TOOLING:
            author = package
        tb = tb.tb_next
    return author


def raised_in_tpc(err: BaseException) -> BaseException | None:
    """``err``, or the exception it was raised from, when that started in tpc's own code (below
    the frame that caught it): then it is a tpc bug, not a failure of the user's model."""
    seen = set()
    first = True
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        if first and tb is not None:
            tb = tb.tb_next  # the frame that caught it: tpc's call site
        first = False
        if _innermost_author(tb) == "tpc":
            return err
        err = err.__cause__ or err.__context__
    return None


def _refusal_inside(err: BaseException) -> TpcError | None:
    """The ``TpcError`` that ``err`` is, or was explicitly raised from (torch.onnx wraps what a
    translation raises with ``raise ... from``). Only causes count: a bug raised while handling a
    refusal has that refusal as its context, and it is still a bug."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, TpcError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def refusal_or_bug(err: Exception, message: str) -> Exception:
    """What to raise for ``err``, caught around torch or ONNX tooling running the user's model:
    the ``TpcError`` ``message`` when the model or the tooling failed; a ``TpcInternalError``
    (with the same words) when tpc's own code did. A ``TpcError`` raised inside, even one the
    tooling wrapped in its own exception, is a deliberate refusal and stays itself."""
    refusal = _refusal_inside(err)
    if refusal is not None:
        return refusal
    bug = raised_in_tpc(err)
    if bug is not None:
        first = (str(bug).strip().splitlines() or [""])[0]
        return TpcInternalError(f"internal error: {message.split(':')[0]}: {type(bug).__name__}: {first}; {REPORT}")
    return TpcError(message)
