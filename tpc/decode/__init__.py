"""Decode-time sparse attention for decoder language models (TidalDecode).

The decode step (one new token per sequence over the KV cache) is captured with
torch.export and rewritten so that sparse layers read only selected cache positions.
"""

from tpc.decode.capture import capture_step, decoder_spec
from tpc.decode.compile import compile_decoder
from tpc.decode.graph import refuse_decode_step
from tpc.decode.module import DecodeModule, DecodeReport, describe
from tpc.decode.plan import METHODS, check_settings, make_plan

__all__ = ["METHODS", "DecodeModule", "DecodeReport", "capture_step", "compile_decoder", "decoder_spec", "make_plan", "check_settings", "describe",
           "refuse_decode_step"]
