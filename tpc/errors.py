"""The error types: refusals the user can act on, and tpc's own bugs.

A ``TpcError`` carries a message meant to be printed as a single line: what was wrong and
what to do instead. The CLI prints it without a traceback and exits non-zero. Anything else
raised inside tpc is a bug in tpc; the pass manager reports it as a ``TpcInternalError``
(which is deliberately not a ``TpcError``), naming the pass and the node it was at.
"""

REPORT = "this is a bug in tpc, not a problem with your model: please report it with the command and the " \
         "traceback (rerun with --debug, or catch TpcInternalError)"


class TpcError(Exception):
    """A user-facing failure: bad input, an unsupported model, or a graph tpc refuses."""


class TpcInternalError(RuntimeError):
    """A bug inside tpc: the pass (and node) where it happened; the original exception is its cause."""
