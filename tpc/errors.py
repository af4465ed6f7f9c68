"""The one error type users see.

A ``TpcError`` carries a message meant to be printed as a single line: what was wrong and
what to do instead. The CLI prints it without a traceback and exits non-zero.
"""


class TpcError(Exception):
    """A user-facing failure: bad input, an unsupported model, or a graph tpc refuses."""
