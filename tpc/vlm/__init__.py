"""Visual-token pruning in vision-language models (LLaVA): capture, rewrite, generate.

``compile_vlm(model, processor_outputs, method=…, layers=…, keep=…)`` returns a
:class:`~tpc.vlm.module.VlmModule` whose ``generate`` runs the pruned prefill and decodes
from its smaller KV cache; with ``decode={"method": "tidal", …}`` its decode steps read only
selected cache positions, with ``decode={"method": "h2o", "keep": 256}`` its KV cache holds
that budget while it generates (``tpc.vlm.decode``). See docs/vlm.md.
"""

from tpc.vlm.compile import capture_prefill, compile_vlm, prune
from tpc.vlm.decode import capture_decode_step, decode_settings
from tpc.vlm.family import FAMILIES, is_vlm, spec_of
from tpc.vlm.flops import prefill_flops, prefill_gflops
from tpc.vlm.module import VlmModule
from tpc.vlm.report import describe

__all__ = ["FAMILIES", "VlmModule", "capture_decode_step", "capture_prefill", "compile_vlm", "decode_settings",
           "describe", "is_vlm", "prefill_flops", "prefill_gflops", "prune", "spec_of"]
