"""Slow references for decode-time sparse attention, written from the papers with loops over
heads and positions (they do not call ``tpc``): TidalDecode's selected positions, Quest's
selected pages, DHSA's chunks and selected positions, and one decode step of a stock Llama-style model whose sparse layers attend
only to those positions."""

from __future__ import annotations

import math

import torch


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def tidal_positions(q, keys, valid, keep: int, scale: float) -> list[list[list[int]]]:
    """TidalDecode's selection (arXiv 2410.05076 §3), grouped: per example b and KV head h, the
    new query's softmax attention over the keys (q: [B, H, 1, d], keys: [B, Hkv, L + 1, d] with
    the new token's last, valid: [B, L + 1] bool), summed over the query heads of h's group; the
    ``keep`` best of the L cached positions (ties: lower position), ascending."""
    batch, heads, kv_heads, length = q.shape[0], q.shape[1], keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    out = []
    for b in range(batch):
        rows = []
        for h in range(kv_heads):
            mass = [0.0] * length
            for g in range(group):
                query = q[b, h * group + g, 0].double()
                logits = [float(query @ keys[b, h, j].double()) * scale if valid[b, j] else -math.inf
                          for j in range(length)]
                for j, p in enumerate(_softmax(logits)):
                    mass[j] += p
            order = sorted(range(length - 1), key=lambda j: (-mass[j], j))
            rows.append(sorted(order[:min(keep, length - 1)]))
        out.append(rows)
    return out


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _attend(q, keys, values, positions, scale):
    """One query head over the given positions of one KV head, by a loop."""
    logits = [float(q.double() @ keys[j].double()) * scale for j in positions]
    weights = _softmax(logits)
    return sum(w * values[j].double() for w, j in zip(weights, positions))


def quest_positions(q, keys, valid, page: int, count: int) -> list[list[list[int]]]:
    """Quest's selection (arXiv 2406.10774 §3, Alg. 1), grouped: per example b and KV head h, its
    valid cached positions (keys: [B, Hkv, L, d], valid: [B, L + 1] bool) cut into pages of
    ``page`` counted from its first valid position; per page and dimension the min m and max M of
    its valid keys; the page's bound for query head g is sum_d max(q_d m_d, q_d M_d), summed over
    the query heads of h's group; the valid positions of the ``count`` best pages (ties: lower
    page), ascending."""
    batch, heads, kv_heads, length, width = q.shape[0], q.shape[1], keys.shape[1], keys.shape[2], keys.shape[3]
    group = heads // kv_heads
    out = []
    for b in range(batch):
        first = min([j for j in range(length) if valid[b, j]], default=length)
        pages = [[j for j in range(start, min(start + page, length)) if valid[b, j]]
                 for start in range(first, length, page)]
        rows = []
        for h in range(kv_heads):
            bounds = {}
            for number, members in enumerate(pages):
                if not members:
                    continue
                total = 0.0
                for g in range(group):
                    query = q[b, h * group + g, 0].double()
                    for d in range(width):
                        low = min(float(keys[b, h, j, d]) for j in members)
                        high = max(float(keys[b, h, j, d]) for j in members)
                        total += max(float(query[d]) * low, float(query[d]) * high)
                bounds[number] = total
            best = sorted(bounds, key=lambda n: (-bounds[n], n))[:count]
            rows.append(sorted(j for n in best for j in pages[n]))
        out.append(rows)
    return out


def quest_step(model, token, position, valid, past, layers, keep, page):
    """Logits [B, vocab] of one decode step and the positions each quest layer read: each layer in
    ``layers`` attends only to the valid positions of its ceil(keep / page) best pages (and the new
    token), every other layer to every valid position."""
    count = -(-keep // page)
    chosen = {}

    def read(i, q, keys):
        if i not in layers:
            return None
        chosen[i] = quest_positions(q, keys[:, :, :-1], valid, page, count)
        return chosen[i]

    return _decode_step(model, token, position, valid, past, read), chosen


def _cosine(a, b) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)), 1e-8)


def dhsa_chunks(keys, valid, min_chunk: int, max_chunk: int, threshold: float) -> list[list[list[int]]]:
    """Per example b, its chunks (lists of cached positions): its valid positions (keys: [B, Hkv, L, d], valid:
    [B, L + 1] bool) in order, a new chunk opened at position p when the current one holds ``max_chunk``, or
    holds ``min_chunk`` and the cosine similarity of p's key with the previous position's, averaged over the
    KV heads, is below ``threshold`` (tpc's training-free stand-in for DHSA's boundary predictor)."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    out = []
    for b in range(batch):
        chunks = []
        for p in [j for j in range(length) if valid[b, j]]:
            if chunks:
                size = len(chunks[-1])
                similarity = sum(_cosine(keys[b, h, p - 1], keys[b, h, p]) for h in range(kv_heads)) / kv_heads
                if size >= max_chunk or (size >= min_chunk and similarity < threshold):
                    chunks.append([])
            else:
                chunks.append([])
            chunks[-1].append(p)
        out.append(chunks)
    return out


def dhsa_positions(q, keys, valid, keep: int, min_chunk: int, max_chunk: int,
                   threshold: float) -> list[list[list[int]]]:
    """DHSA's decode-time selection (arXiv 2510.24606 §3), grouped: per example b and KV head h, each chunk
    (:func:`dhsa_chunks`) represented by sqrt(n) times the mean of its n keys (length-normalized
    aggregation); the chunk's score q · k̄ summed over the query heads of h's group; every position of a
    chunk gets its chunk's score (upsampling); the ``keep`` best positions (ties: lower position), ascending."""
    heads, kv_heads, width = q.shape[1], keys.shape[1], keys.shape[3]
    group = heads // kv_heads
    out = []
    for b, chunks in enumerate(dhsa_chunks(keys, valid, min_chunk, max_chunk, threshold)):
        rows = []
        for h in range(kv_heads):
            token = {}
            for members in chunks:
                mean = [sum(float(keys[b, h, j, d]) for j in members) / len(members) for d in range(width)]
                representation = [math.sqrt(len(members)) * m for m in mean]
                score = sum(float(q[b, h * group + g, 0, d]) * representation[d]
                            for g in range(group) for d in range(width))
                for j in members:
                    token[j] = score
            best = sorted(token, key=lambda j: (-token[j], j))[:keep]
            rows.append(sorted(best))
        out.append(rows)
    return out


def dhsa_step(model, token, position, valid, past, layers, keep, min_chunk, max_chunk, threshold):
    """Logits [B, vocab] of one decode step and the positions each dhsa layer read: each layer in ``layers``
    attends only to its ``keep`` best positions by :func:`dhsa_positions` (and the new token), every other
    layer to every valid position."""
    chosen = {}

    def read(i, q, keys):
        if i not in layers:
            return None
        chosen[i] = dhsa_positions(q, keys[:, :, :-1], valid, keep, min_chunk, max_chunk, threshold)
        return chosen[i]

    return _decode_step(model, token, position, valid, past, read), chosen


def tidal_step(model, token, position, valid, past, selection, keep):
    """Logits [B, vocab] of one decode step and the positions each selection layer chose.

    ``past``: per layer (k, v) [B, Hkv, L, d]; ``valid``: [B, L + 1] bool (padding false);
    layers before the first selection layer and the selection layers attend to every valid
    position, every other layer only to the positions its last selection layer chose (and the
    new token)."""
    chosen, source = {}, []

    def read(i, q, keys):
        scale = q.shape[-1] ** -0.5
        if i in selection:
            chosen[i] = tidal_positions(q, keys, valid, keep, scale)
            source[:] = [i]
            return None
        return chosen[source[0]] if source else None

    return _decode_step(model, token, position, valid, past, read), chosen


def _decode_step(model, token, position, valid, past, read):
    """Logits [B, vocab] of one decode step of a stock Llama-style model, layer i's query heads of KV
    head h attending to the valid positions among ``read(i, q, keys)[b][h]`` and the new token
    (``read`` returning None: every valid position)."""
    lm = model.model
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // heads
    scale = width ** -0.5
    batch, length = token.shape[0], past[0][0].shape[2]
    hidden = lm.embed_tokens(token)
    cos, sin = lm.rotary_emb(hidden, position)
    cos, sin = cos[:, None], sin[:, None]
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = _rotate(attn.q_proj(x).view(batch, 1, heads, width).transpose(1, 2), cos, sin)
        k = _rotate(attn.k_proj(x).view(batch, 1, kv_heads, width).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(batch, 1, kv_heads, width).transpose(1, 2)
        keys, values = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        sparse = read(i, q, keys)
        out = torch.zeros(batch, heads, width, dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                kv = h // group
                if sparse is None:
                    positions = [j for j in range(length + 1) if valid[b, j]]
                else:
                    positions = [j for j in sparse[b][kv] if valid[b, j]] + [length]
                out[b, h] = _attend(q[b, h, 0], keys[b, kv], values[b, kv], positions, scale)
        hidden = hidden + attn.o_proj(out.to(hidden.dtype).reshape(batch, 1, heads * width))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(lm.norm(hidden))[:, -1]
