"""Ctrl-C and SIGTERM, remembered: torch can turn the exception they raise into another one.

A signal's Python handler runs at the next bytecode; when that is inside torch's C++ argument
parsing (fake tensors during ``torch.export``), the ``KeyboardInterrupt`` or ``Terminated`` it
raises comes out as a ``TypeError`` ("failed to unpack the object ... with error Terminated"),
which tpc would report as the model failing to export — or, where a refusal is counted and the
work goes on (``tpc tune``), swallow. The CLI's handlers record the signal, so the code that
catches errors can raise the interrupt it really was (``raise_if_signalled``).
"""

from __future__ import annotations

import signal

_received: int | None = None


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that partial files are removed on the way out."""


def handle(signum, frame) -> None:
    """The handler the CLI installs for SIGINT and SIGTERM: remember the signal, then raise its exception."""
    global _received
    _received = signum
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def received() -> int | None:
    """The signal the handler saw and nobody has taken yet (``clear``), else None."""
    return _received


def clear() -> None:
    global _received
    _received = None


def raise_if_signalled() -> None:
    """Raise the interrupt the handler saw, when another exception is being handled in its place."""
    if _received == signal.SIGINT:
        raise KeyboardInterrupt
    if _received is not None:
        raise Terminated
