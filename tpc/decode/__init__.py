"""Decode-time sparse attention for decoder language models (TidalDecode).

The decode step (one new token per sequence over the KV cache) is captured with
torch.export and rewritten so that sparse layers read only selected cache positions.
"""

from tpc.decode.capture import capture_step, decoder_spec, is_decoder_lm, refuse_encoder_method
from tpc.decode.compile import compile_decoder
from tpc.decode.graph import refuse_decode_step
from tpc.decode.module import DecodeModule, DecodeReport, describe
from tpc.decode.plan import check_settings, decode_time, make_plan

__all__ = ["DecodeModule", "DecodeReport", "capture_step", "check_settings", "compile_decoder", "decode_time",
           "decoder_spec", "describe", "is_decoder_lm", "make_plan", "refuse_decode_step",
           "refuse_encoder_method"]
