"""``compile_decoder``: capture a decoder LM's decode step, rewrite it for a decode-time method."""

from __future__ import annotations

from torch import nn

from tpc.decode.capture import capture_step, decoder_spec
from tpc.decode.module import DecodeModule, describe
from tpc.decode.plan import make_plan
from tpc.passes import PassManager
from tpc.record import remember_unpruned
from tpc.registry import Where, get_method


def compile_decoder(model: nn.Module, *, method: str = "tidal", layers=None, keep=None,
                    program=None) -> DecodeModule:
    """``model``'s decode step with ``method``'s sparse attention (``layers``: the selection
    layers, default layer 2 and the middle one; ``keep``: cached positions the sparse layers read).
    ``program``: a decode step captured before (``capture_step``), reused as it is."""
    plan = make_plan(method, decoder_spec(model)[0], layers, keep)  # refuse before capturing
    program = program if program is not None else capture_step(model)
    gm = program.module()
    rewrite = get_method(plan.method, Where.DECODE).implementation(Where.DECODE)  # the method's pass
    PassManager([rewrite(plan)])(gm)
    remember_unpruned(gm, program.module)
    return DecodeModule(gm, model, describe(model, plan), program, plan)
