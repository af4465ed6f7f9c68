"""``compile_decoder``: capture a decoder LM's decode step, rewrite it for a decode-time method
(the plan is the decoder's own; capture, passes and lowering run in :func:`tpc.pipeline.rewrite_decode_step`)."""

from __future__ import annotations

from torch import nn

from tpc import pipeline
from tpc.decode.capture import decoder_spec
from tpc.decode.module import DecodeModule
from tpc.decode.plan import make_plan


def compile_decoder(model: nn.Module, *, method: str = "tidal", layers=None, keep=None, options=None,
                    program=None) -> DecodeModule:
    """``model``'s decode step with ``method``'s sparse attention (``layers``: tidal's selection
    layers, default layer 2 and the middle one, or quest's sparse layers, default layer 2 on;
    ``keep``: cached positions the sparse layers read, or a ratio of the cache in (0, 1]; ``options``: the method's, as quest's page).
    ``program``: a decode step captured before (``capture_step``), reused as it is."""
    plan = make_plan(method, decoder_spec(model)[0], layers, keep, options)  # refuse before capturing
    return pipeline.rewrite_decode_step(model, plan, program)
