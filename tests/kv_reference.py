"""Slow references for compressed KV caches, written from the papers with loops over heads and
positions (they do not call ``tpc``): one example at a time, no padding, a stock Llama-style
model run layer by layer, each KV head's cache a dict {sequence index: (key, value)}.

Rules (per KV head; a group's query heads vote together; ties keep the older position):
StreamingLLM (arXiv 2309.17453 §3.2) the first ``sinks`` and the newest positions; H2O (arXiv
2306.14048 Alg. 1) the ``recent`` newest and the most attended over every query so far; SnapKV
(arXiv 2404.14469 §4.2) at the end of the prompt the ``window`` newest and the prefix positions
with the most pooled votes of the window's queries, nothing evicted while decoding; Scissorhands
(arXiv 2305.17118 Alg. 2) the ``recent`` newest and those least often below the mean attention
over the last ``history`` queries.
"""

from __future__ import annotations

import math

import torch


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Head:
    """One KV head's cache and its method's state."""

    def __init__(self):
        self.kv, self.mass, self.history, self.votes = {}, {}, [], {}


def _keep(head: Head, method: str, budget: int, options: dict, prefill: bool) -> None:
    seq = sorted(head.kv)
    if len(seq) <= budget or method == "snapkv" and not prefill:
        return
    if method == "streaming":
        ranked = seq[:options["sinks"]] + sorted(seq[options["sinks"]:], reverse=True)
    else:
        recent = {"h2o": options.get("recent") or budget // 2, "snapkv": options.get("window"),
                  "scissorhands": options.get("recent")}[method]
        newest, older = seq[len(seq) - recent:], seq[:len(seq) - recent]
        if method == "h2o":
            score = {j: head.mass[j] for j in older}
        elif method == "snapkv":
            k = options["kernel"]
            votes = [head.votes.get(j, 0.0) for j in older]
            score = {j: sum(votes[i + o] for o in range(-(k // 2), k // 2 + 1) if 0 <= i + o < len(older)) / k
                     for i, j in enumerate(older)}
        else:
            score = {j: -sum(row.get(j, 0) for row in head.history) for j in older}
        ranked = newest + sorted(older, key=lambda j: (-score[j], j))
    for j in set(seq) - set(ranked[:budget]):
        del head.kv[j]


def _attention(q, keys, scale):
    logits = [float(q.double() @ k.double()) * scale for k in keys]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


@torch.no_grad()
def run(model, tokens: list[int], method: str, budget: int, options: dict, steps: int, first: int = 0,
        embeds: torch.Tensor | None = None, positions: list[int] | None = None):
    """Greedy-decode ``steps`` tokens after the prompt ``tokens`` with a compressed cache.

    Returns (kept, generated): kept[phase][layer][kv head] the sorted sequence indices each
    head keeps after the prompt (phase 0) and after each new token; ``first``: the sequence
    index of the prompt's first token (its left padding in a batch). A prompt given as ``embeds``
    [T, D] at rotary ``positions`` (a VLM's pruned prompt; ``tokens`` then unused): the new tokens'
    rotary positions continue from its last one."""
    lm, config = model.model, model.config
    if embeds is not None:
        tokens = [None] * len(embeds)
    shift = 0 if positions is None else positions[-1] + 1 - len(tokens)  # rotary position less sequence index
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group, width = heads // kv_heads, config.hidden_size // heads
    scale = width ** -0.5
    cache = [[Head() for _ in range(kv_heads)] for _ in lm.layers]
    kept, generated, chunk, start = [], [], list(tokens), 0
    for phase in range(steps + 1):
        if phase == 0 and embeds is not None:
            hidden = embeds[None]
        else:
            hidden = lm.embed_tokens(torch.tensor([chunk]))
        rotary = torch.tensor([positions]) if phase == 0 and positions is not None else \
            shift + torch.arange(start, start + len(chunk))[None]
        cos, sin = lm.rotary_emb(hidden, rotary)
        for i, layer in enumerate(lm.layers):
            attn, x = layer.self_attn, layer.input_layernorm(hidden)
            q = _rotate(attn.q_proj(x).view(1, -1, heads, width).transpose(1, 2), cos[:, None], sin[:, None])[0]
            k = _rotate(attn.k_proj(x).view(1, -1, kv_heads, width).transpose(1, 2), cos[:, None], sin[:, None])[0]
            v = attn.v_proj(x).view(1, -1, kv_heads, width).transpose(1, 2)[0]
            out = torch.zeros(len(chunk), heads, width, dtype=torch.float64)
            rows = {h: [] for h in range(kv_heads)}
            for t in range(len(chunk)):
                for h in range(kv_heads):
                    head = cache[i][h]
                    seen = sorted(head.kv) + [first + start + u for u in range(t + 1)]
                    keys = [head.kv[j][0] for j in sorted(head.kv)] + [k[h, u] for u in range(t + 1)]
                    values = [head.kv[j][1] for j in sorted(head.kv)] + [v[h, u] for u in range(t + 1)]
                    row = {}
                    for g in range(group):
                        p = _attention(q[h * group + g, t], keys, scale)
                        out[t, h * group + g] = sum(w * val.double() for w, val in zip(p, values))
                        for j, w in zip(seen, p):
                            head.mass[j] = head.mass.get(j, 0.0) + w
                            row[j] = row.get(j, 0) + (w < 1.0 / len(seen))
                            if len(chunk) - t <= options.get("window", 0):
                                head.votes[j] = head.votes.get(j, 0.0) + w
                    rows[h].append(row)
            for h in range(kv_heads):
                head = cache[i][h]
                for u in range(len(chunk)):
                    head.kv[first + start + u] = (k[h, u], v[h, u])
                head.history = (head.history + rows[h])[-options.get("history", 1):]
                _keep(head, method, budget, options, prefill=phase == 0)
            attended = attn.o_proj(out.reshape(1, len(chunk), heads * width).float())
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        kept.append([[sorted(h.kv) for h in layer] for layer in cache])
        token = int(model.lm_head(lm.norm(hidden))[0, -1].argmax())
        generated.append(token)
        start += len(chunk)
        chunk = [token]
    return kept, generated
