"""Decoder language models: decode-time sparse attention (TidalDecode, Quest, DHSA) and compressed KV caches.

The decode step (one new token per sequence over the KV cache) is captured with
torch.export and rewritten so that sparse layers read only selected cache positions
(``compile_decoder``), or so that it returns each layer's attention scores, by which a
compressed cache evicts positions (``compile_compressed``: streaming, h2o, snapkv, scissorhands).
"""

from tpc.decode.capture import capture_step, decoder_spec, is_decoder_lm, refuse_encoder_method
from tpc.decode.compile import compile_decoder
from tpc.decode.compressed import CompressedDecoder, compile_compressed
from tpc.decode.kv_cache import compressed_cache
from tpc.decode.kv_methods import check_keep, eviction_rule, kv_eviction, refuse_kv_artifact
from tpc.decode.graph import refuse_decode_step
from tpc.decode.module import DecodeModule, DecodeReport, describe
from tpc.decode.plan import check_settings, decode_time, make_plan

__all__ = ["CompressedDecoder", "DecodeModule", "DecodeReport", "capture_step", "check_keep", "check_settings",
           "compile_compressed", "compile_decoder", "compressed_cache", "decode_time", "decoder_spec", "describe",
           "eviction_rule", "is_decoder_lm", "kv_eviction", "make_plan", "refuse_decode_step", "refuse_encoder_method",
           "refuse_kv_artifact"]
