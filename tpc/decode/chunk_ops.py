"""The ``tpc::`` ops of DHSA's chunk-level selection at decode time (reference and fake implementations).

DHSA (Xiong, Zou, Fekri, Cho; NeurIPS 2025, arXiv 2510.24606, §3): the sequence is cut into
variable-length chunks C_0 … C_{N_c − 1} at boundaries 0 = b_0 < b_1 < … < b_{N_c} = L; each chunk
is represented by the mean of its keys scaled by the square root of its size (length-normalized
aggregation, so that a long chunk's mean is not favoured or penalized for its length)::

    k̄_c = sqrt(|C_c|) · mean_{j ∈ C_c} k_j

the query's similarity with each chunk, q · k̄_c, is upsampled to the chunk's tokens (every token
of C_c gets its chunk's score), and each query attends to its N_b best tokens only.

Boundaries (where tpc differs from the paper): the paper predicts them with a small trained network
(an encoder over the left and right context of each token, feature fusion, an MLP), trained on labels
drawn from similarity shifts between consecutive keys. tpc trains nothing, so it applies that labelling
rule itself, on the layer's own keys, training-free: position p opens a new chunk when the cosine
similarity of its key with the previous position's key, averaged over the KV heads, is below
``threshold`` and the current chunk holds ``min_chunk`` positions, or when the current chunk holds
``max_chunk``. The rule reads only positions p − 1 and p and the current chunk's length, so a chunk
once closed never changes: appending a token updates the last chunk only (``tpc/decode/chunks.py``).

Shapes: B batch, H query heads, Hkv KV heads, G = H / Hkv, L cached positions (the new token not
included), d head width, C = ceil(L / min_chunk) chunk slots (every chunk but the last holds
``min_chunk`` positions or more, so C slots hold them all; unused slots have length 0). ``mask`` is
the decode step's SDPA mask [B, 1, 1, L + 1] (bool: may attend; float: added to the logits), its
last column the new token; each example's chunks start at its first prompt token (left padding
belongs to no chunk), so an example is chunked alike in any batch.
"""

from __future__ import annotations

import torch

from tpc.decode.ops import selected_size
from tpc.decode.page_ops import _valid

_LIB = "tpc"


def chunk_slots(length, min_chunk: int):
    """C: the chunk slots of ``length`` cached positions (each chunk but the last holds ``min_chunk`` or more)."""
    return (length + min_chunk - 1) // min_chunk


def opens(length, similarity, min_chunk: int, max_chunk: int, threshold: float):
    """Whether a position opens a new chunk after a chunk of ``length`` positions, its key's cosine similarity
    with the previous key (averaged over KV heads) being ``similarity`` (Python numbers or tensors alike)."""
    return (length >= max_chunk) | ((length >= min_chunk) & (similarity < threshold))


def adjacent_similarity(previous: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each key with the key before it, averaged over the KV heads, float32:
    ``previous``, ``keys`` [B, Hkv, …, d] -> [B, …]."""
    return torch.nn.functional.cosine_similarity(keys.float(), previous.float(), dim=-1).mean(1)


def chunk_ids(keys: torch.Tensor, mask: torch.Tensor, min_chunk: int, max_chunk: int,
              threshold: float) -> torch.Tensor:
    """[B, L] int64: the chunk of each cached position (-1: padding, in no chunk), by the boundary rule."""
    valid = _valid(mask)[:, :-1]
    similarity = adjacent_similarity(keys[:, :, :-1], keys[:, :, 1:]).tolist()  # [B][L - 1]: position p at p - 1
    rows = []
    for b, usable in enumerate(valid.tolist()):
        row, chunk, length = [], -1, 0
        for p, ok in enumerate(usable):
            if not ok:
                row.append(-1)
                continue
            if chunk < 0 or opens(length, similarity[b][p - 1], min_chunk, max_chunk, threshold):
                chunk, length = chunk + 1, 0
            row.append(chunk)
            length += 1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=keys.device).reshape(valid.shape)


@torch.library.custom_op(f"{_LIB}::chunk_summary", mutates_args=())
def chunk_summary(keys: torch.Tensor, mask: torch.Tensor, min_chunk: int, max_chunk: int,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(representations [B, Hkv, C, d] float32, spans [B, 2, C] int64) of the chunks of the cached keys:
    per chunk sqrt(n) · mean of its n keys (sum / sqrt(n)), and its first position (index 0) and length
    n (index 1); unused slots hold zeros.

    keys: [B, Hkv, L, d], rotary applied (the layer's cached keys); mask: [B, 1, 1, L + 1]."""
    b, heads, length, width = keys.shape
    slots = chunk_slots(length, min_chunk)
    ids = chunk_ids(keys, mask, min_chunk, max_chunk, threshold)
    target = ids.masked_fill(ids < 0, slots)  # padding goes to an extra slot, dropped below
    sums = keys.new_zeros((b, heads, slots + 1, width), dtype=torch.float32)
    sums.scatter_add_(2, target[:, None, :, None].expand(b, heads, length, width), keys.float())
    counts = torch.zeros(b, slots + 1, dtype=torch.int64, device=keys.device)
    counts.scatter_add_(1, target, torch.ones_like(target))
    positions = torch.arange(length, device=keys.device).expand(b, length)
    starts = torch.full((b, slots + 1), length, dtype=torch.int64, device=keys.device)
    starts.scatter_reduce_(1, target, positions, reduce="amin")
    counts, starts = counts[:, :slots], starts[:, :slots]
    representations = sums[:, :, :slots] / counts.clamp(min=1).float().sqrt()[:, None, :, None]
    return representations, torch.stack([starts.masked_fill(counts == 0, 0), counts], 1)


@chunk_summary.register_fake
def _(keys, mask, min_chunk, max_chunk, threshold):
    b, heads, length, width = keys.shape
    slots = chunk_slots(length, min_chunk)
    return (keys.new_empty((b, heads, slots, width), dtype=torch.float32),
            keys.new_empty((b, 2, slots), dtype=torch.int64))


@torch.library.custom_op(f"{_LIB}::chunk_scores", mutates_args=())
def chunk_scores(q: torch.Tensor, representations: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, C] float32: the new query's similarity q · k̄_c with each chunk's representation (unscaled),
    summed over the G query heads of each KV head; unused slots are -inf.

    q: [B, H, 1, d]; representations, spans: :func:`chunk_summary`."""
    b, heads, _, width = q.shape
    kv_heads = representations.shape[1]
    grouped = q.float().reshape(b, kv_heads, heads // kv_heads, width)
    scores = (grouped @ representations.float().transpose(-1, -2)).sum(2)
    return scores.masked_fill((spans[:, 1] == 0)[:, None], float("-inf"))


@chunk_scores.register_fake
def _(q, representations, spans):
    return q.new_empty(representations.shape[:3], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::chunk_positions", mutates_args=())
def chunk_positions(scores: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, Hkv, min(count, L)] int64, ascending: the ``count`` best cached positions once each chunk's score is
    upsampled to its positions (DHSA's token-level importance), ties to the lower position (a stable sort):
    the best chunks whole, in score order, then the first positions of the next. It reads the chunks'
    scores and spans only, never a per-position score. Slots past an example's positions (a budget over
    its prompt, in a batch with longer ones) point at its first padding position, which the mask hides.

    scores: :func:`chunk_scores`; spans: :func:`chunk_summary`'s; mask: [B, 1, 1, L + 1]."""
    b, kv_heads, slots = scores.shape
    keep = min(count, mask.shape[-1] - 1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, Hkv, C]
    starts = spans[:, None, 0].expand(b, kv_heads, slots)
    lengths = torch.gather(spans[:, None, 1].expand(b, kv_heads, slots), 2, order)
    ends = lengths.cumsum(-1)  # positions covered by the best chunks up to each
    slot = torch.arange(keep, device=scores.device).expand(b, kv_heads, keep).contiguous()
    which = torch.searchsorted(ends, slot, right=True)  # the chunk (in score order) slot i falls in
    inside = which < slots
    which = which.clamp(max=slots - 1)
    offset = slot - (torch.gather(ends, 2, which) - torch.gather(lengths, 2, which))
    positions = torch.gather(torch.gather(starts, 2, order), 2, which) + offset
    padding = (~_valid(mask)[:, :-1]).int().argmax(-1)  # [B]: the first masked position (0 with left padding)
    positions = torch.where(inside, positions, padding[:, None, None])
    return torch.sort(positions, dim=-1).values


@chunk_positions.register_fake
def _(scores, spans, mask, count):
    return scores.new_empty((*scores.shape[:2], selected_size(count, mask.shape[-1] - 1)), dtype=torch.int64)
