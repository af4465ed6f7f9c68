"""TidalDecode's cache correction: every ``correct`` new tokens, one dense pass rewrites their KV.

Keys and values that a sparse step caches for a generated token differ from those full attention
would give ("polluted tokens", TidalDecode, arXiv 2410.05076, §3.3), and later tokens attend to them.
Every ``correct`` fed tokens, the stock model runs once, densely, over those tokens as a chunk (a
chunked prefill over the cache before them, itself dense or already corrected); their keys and values
replace the sparse ones in the KV buffer, and the chunk's last logits give the next token. The
paper's code (``eval_aime_cache_correction.py``, stride 128) re-prefills the whole context and the
round's tokens but the last, then predicts that last token again; tpc feeds the round's last token in
the same dense pass, so the correction also serves as that step's decode and no token is redrawn.
"""

from __future__ import annotations

import torch
from torch import nn

from tpc.decode.capture import step_cache


def corrected_step(model: nn.Module, kv, tokens: torch.Tensor, position: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` [B, T] (the last T fed tokens; the first T - 1 already cached by sparse steps, the
    last not yet) through ``model`` densely over the cache before them; ``kv`` (a ``KVBuffer``) then holds
    the dense keys and values of all T. ``position`` [B, 1] is the last token's position,
    ``attention_mask`` [B, L + 1] covers the cache and it. Returns the last token's logits [B, vocab]."""
    count = tokens.shape[1]
    start = kv.length - (count - 1)
    cache = step_cache([view[:, :, :start] for view in kv.views()])
    positions = position + torch.arange(1 - count, 1, device=position.device)
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, cache=cache,
                    use_cache=True)
    kv.replace(start, [t for layer in cache.layers for t in layer.new])
    return out.logits[:, -1].float()
