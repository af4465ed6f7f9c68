"""Slow, obviously-correct references: loops over tokens, and eager forwards of the test
models that prune exactly as a schedule says, written without tpc.

Every method's reference is written here from its paper, one token (pair) at a time, and
never calls ``tpc.methods``: [CLS] attention and EViT's fused token (topk-cls), received
attention mass (topk-mass), Weighted PageRank with its head filter and the similarity stage
(zero-tprune), greedy k-center and max-min diversity (kcenter, divprune), bipartite soft
matching with size-weighted merges (tome). The random method's scores are its production
hash (``tpc.methods.baseline.hash_scores``): what makes them right is a contract (seeded,
uniform, blind to the tokens' content), checked in tests/test_kernels.py, not a formula to
transcribe; the references here take the top-k of those scores on their own."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpc.methods import baseline


def cls_attention_slow(q, k, scale, mask=None):
    """Head-mean softmax of query 0 against every key, one dot product at a time."""
    b, h, n, d = k.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            logits = []
            for j in range(n):
                dot = sum(float(q[bi, hi, 0, t]) * float(k[bi, hi, j, t]) for t in range(d)) * scale
                if mask is not None:
                    m = mask.expand(b, h, n, n)[bi, hi, 0, j] if mask.dim() == 4 else mask[..., 0, j].reshape(-1)[0]
                    if mask.dtype == torch.bool:
                        dot = dot if bool(m) else -math.inf
                    else:
                        dot += float(m)
                logits.append(dot)
            top = max(logits)
            exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
            total = sum(exps)
            for j in range(n):
                out[bi, j] += exps[j] / total / h
    return out


def select_slow(scores, k, prefix):
    """Prefix tokens, then the k best others (ties: lower index first), in sequence order."""
    rows = []
    for row in scores.tolist():
        others = sorted(range(prefix, len(row)), key=lambda j: (-row[j], j))[:k]
        rows.append(list(range(prefix)) + sorted(others))
    return torch.tensor(rows, dtype=torch.int64)


def gather_slow(x, index):
    b, kk = index.shape
    out = torch.empty(b, kk, *x.shape[2:], dtype=x.dtype)
    for bi in range(b):
        for j in range(kk):
            out[bi, j] = x[bi if x.shape[0] > 1 else 0, index[bi, j]]
    return out


def cos_dist_slow(x):
    """[N][N] cosine distances 1 - a·b / (|a| |b|) between the rows of x, in float64."""
    n = x.shape[0]
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            a, b = x[i].double(), x[j].double()
            d[i][j] = 1.0 - float(a @ b) / max(1e-12, float(a.norm()) * float(b.norm()))
    return d


def greedy_slow(d, chosen, candidates, count):
    """Greedy farthest-point picks: each time the candidate whose nearest chosen token is farthest
    (ties: the first candidate)."""
    chosen = list(chosen)
    picks = []
    for _ in range(count):
        best, best_j = -math.inf, None
        for j in candidates:
            if j in chosen or j in picks:
                continue
            near = min(d[j][c] for c in chosen + picks) if chosen + picks else math.inf
            if near > best + 1e-9:
                best, best_j = near, j
        picks.append(best_j)
    return picks


def kcenter_slow(x, k, prefix):
    """Greedy k-center (Gonzalez 1985) on cosine distance, per example: seeded with the prefix
    tokens, or without any with the token farthest from the mean; the prefix, then the k
    picks in sequence order. [B, prefix + k]."""
    rows = []
    for b in range(x.shape[0]):
        n = x.shape[1]
        d = cos_dist_slow(x[b])
        if prefix:
            picks = greedy_slow(d, list(range(prefix)), range(prefix, n), k)
        else:
            mean = x[b].double().mean(0)
            far = [1 - float(mean @ x[b, j].double()) / (float(mean.norm()) * float(x[b, j].double().norm())) for j in range(n)]
            first = max(range(n), key=lambda j: (far[j], -j))
            picks = ([first] + greedy_slow(d, [first], range(n), k - 1))[:k] if k else []
        rows.append(list(range(prefix)) + sorted(picks))
    return torch.tensor(rows, dtype=torch.int64)


def divprune_slow(x, k, prefix):
    """DivPrune's max-min diversity (Alvar et al., CVPR 2025) on cosine distance among the
    non-prefix tokens: first the token whose nearest neighbour is farthest, then greedy
    farthest-point picks; the prefix, then the picks in sequence order. [B, prefix + k]."""
    rows = []
    for b in range(x.shape[0]):
        d = cos_dist_slow(x[b, prefix:])
        m = x.shape[1] - prefix
        picks = []
        if k:
            nn = [min(d[i][j] for j in range(m) if j != i) for i in range(m)]
            first = max(range(m), key=lambda i: (nn[i], -i))
            picks = [first] + greedy_slow(d, [first], range(m), k - 1)
        rows.append(list(range(prefix)) + sorted(p + prefix for p in picks))
    return torch.tensor(rows, dtype=torch.int64)


def attention_probs_slow(q, k, scale):
    """[B][H][N][N] softmax(q·kᵀ·s) row by row, in float64."""
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, k.shape[2], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                logits = [float(q[bi, hi, i].double() @ k[bi, hi, j].double()) * scale for j in range(k.shape[2])]
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                for j, e in enumerate(exps):
                    out[bi, hi, i, j] = e / sum(exps)
    return out


def wpr_slow(attn, iterations, v_min, v_max, keep=None):
    """Zero-TPrune's I-stage (arXiv 2305.17328, Sec. 3.1): per head, s⁽⁰⁾ = 1 and
    s_j ← Σ_i A_ij s_i (Eq. 2) on the graph restricted to the kept tokens (rows renormalized);
    heads whose score variance lies outside [v_min, v_max] are left out (VHF; all heads if
    none passes) and the rest combined by root-mean-square (EIR). Dropped tokens score -inf."""
    b, h, n, _ = attn.shape
    out = torch.empty(b, n, dtype=torch.float64)
    for bi in range(b):
        kp = [True] * n if keep is None else keep[bi].tolist()
        per_head = []
        for hi in range(h):
            a = [[float(attn[bi, hi, i, j]) if kp[i] and kp[j] else 0.0 for j in range(n)] for i in range(n)]
            a = [[v / max(1e-12, sum(row)) for v in row] for row in a]
            s = [1.0 if kp[j] else 0.0 for j in range(n)]
            for _ in range(iterations):
                s = [sum(s[i] * a[i][j] for i in range(n)) for j in range(n)]
            per_head.append(s)
        count = sum(kp)
        var = []
        for s in per_head:
            mean = sum(s[j] for j in range(n) if kp[j]) / count
            var.append(sum((s[j] - mean) ** 2 for j in range(n) if kp[j]) / count)
        use = [v_min <= v <= v_max for v in var]
        if not any(use):
            use = [True] * h
        for j in range(n):
            out[bi, j] = math.sqrt(sum(per_head[hi][j] ** 2 for hi in range(h) if use[hi]) / sum(use)) if kp[j] else -math.inf
    return out


def similarity_keep_slow(imp, keys, drop, prefix, partition):
    """Zero-TPrune's S-stage: the non-prefix tokens split in two (sequential: the less important
    half, by importance with ties to the lower position, is group A; alternate: A is every
    second token), each A token scored by its best cosine similarity to a B token, and the
    ``drop`` best-matched A tokens (ties: earlier in A) dropped. [B, N] bool, False = dropped."""
    b, n = imp.shape
    out = torch.ones(b, n, dtype=torch.bool)
    for bi in range(b):
        rest = list(range(prefix, n))
        half = len(rest) // 2
        if partition == "sequential":
            order = sorted(rest, key=lambda j: (float(imp[bi, j]), j))
            group_a, group_b = order[:half], order[half:]
        else:
            group_a, group_b = rest[1::2][:half], rest[0::2] + rest[1::2][half:]
        d = cos_dist_slow(keys[bi])
        best = [max(1 - d[a][j] for j in group_b) for a in group_a]
        for i in sorted(range(len(group_a)), key=lambda i: (-best[i], i))[:max(0, min(drop, half))]:
            out[bi, group_a[i]] = False
    return out


def zero_tprune_iterations_slow(layer, depth):
    """The paper's WPR schedule as tpc reads it: 30 iterations in the first quarter of the
    layers, 1 in the last quarter, 5 between."""
    quarter = (depth - 1) / 4 if depth > 1 else 0.25
    if layer < quarter:
        return 30
    if layer > 3 * quarter:
        return 1
    return 5


def fuse_slow(x, scores, idx):
    """EViT's inattentive-token fusion (Liang et al., ICLR 2022, Sec. 3.3): the kept tokens,
    then one token Σ_{j dropped} a_j x_j with a_j the [CLS] attention of token j."""
    rows = []
    for b in range(x.shape[0]):
        kept = idx[b].tolist()
        fused = sum(float(scores[b, j]) * x[b, j].double() for j in range(x.shape[1]) if j not in kept)
        rows.append(torch.cat([x[b, kept], fused.to(x.dtype)[None]]))
    return torch.stack(rows)


def ratio_kept(keep: float, available: int) -> int:
    """ceil(keep × available), at least 1, with the ratio read as the nearest fraction of denominator
    <= 10^6 (0.55 × 100 is 55, not float's 56): the rule tpc.schedule documents."""
    from fractions import Fraction

    return max(1, math.ceil(Fraction(keep).limit_denominator(10**6) * available))


class R(int):
    """ToMe's r at one layer (tokens removed, clamped there as ToMe clamps it), in a schedule of keeps."""


def tome_merge_slow(keys, x, sizes, r, prefix):
    """ToMe's bipartite soft matching and size-weighted merge (Bolya et al., ICLR 2023, Sec. 3, and
    the token order its merge produces), one example and one token pair at a time, in float64.

    A = even positions, B = odd. r is clamped to (N - prefix) // 2. Every A token that is not a
    prefix token proposes its most cosine-similar non-prefix B token (ties: the first); the r
    strongest proposals (ties: the first A token) merge into their B token, x_b <- Σ s·x / Σ s.
    The merged sequence is the prefix, the unmerged A tokens (in sequence order when there is a
    prefix, strongest proposal first when there is none), then the B tokens.
    Returns (x [B, N - r, C], sizes [B, N - r], positions [B, N - r]: the token each row stands for).
    """
    b, n, _ = keys.shape
    r = max(0, min(r, (n - prefix) // 2))
    xs, ss, ps = [], [], []
    for bi in range(b):
        unit = [keys[bi, j].double() / keys[bi, j].double().norm() for j in range(n)]
        group_a = [a for a in range(0, n, 2) if a >= prefix]
        group_b = [j for j in range(1, n, 2) if j >= prefix]
        proposal = {}
        for a in group_a:
            sims = [(float(unit[a] @ unit[j]), -j) for j in group_b]
            sim, neg_j = max(sims)
            proposal[a] = (sim, -neg_j)
        strongest = sorted(group_a, key=lambda a: (-proposal[a][0], a))
        merged = strongest[:r] if r else []
        unmerged = [a for a in group_a if a not in merged] if prefix else strongest[r:]
        if not r:
            order = list(range(n))
        else:
            order = list(range(prefix)) + unmerged + group_b
        rows, weights = [], []
        for j in order:
            members = [j] + [a for a in merged if proposal[a][1] == j]
            w = sum(float(sizes[bi, m]) for m in members)
            rows.append(sum(float(sizes[bi, m]) * x[bi, m].double() for m in members) / w)
            weights.append(w)
        xs.append(torch.stack(rows))
        ss.append(torch.tensor(weights, dtype=torch.float64))
        ps.append(torch.tensor(order))
    return torch.stack(xs), torch.stack(ss), torch.stack(ps)


def _keep(tokens, prefix, keep):
    return ratio_kept(keep, tokens - prefix) if isinstance(keep, float) else keep


def _take(x, idx, state=None):
    """Rows ``idx`` of every example; after a merge, the token sizes are carried along."""
    if state is not None and "sizes" in state:
        state["sizes"] = torch.stack([state["sizes"][b, idx[b]] for b in range(x.shape[0])])
    return torch.stack([x[b, idx[b]] for b in range(x.shape[0])])


def _prune(x, q, k, scale, keep, prefix, method, layer, depth, state, options=None):
    """One pruning step written directly with the methods' tensor functions (no graph).

    ``method`` may be a dict layer -> method (a mixed recipe)."""
    method = method[layer] if isinstance(method, dict) else method
    options = options or {}
    n = x.shape[1]
    kk = _keep(n, prefix, keep)
    if method in ("topk-cls", "random"):
        if method == "topk-cls":
            scores = cls_attention_slow(q, k, scale)
        else:
            scores = baseline.hash_scores(x.shape[0], n, state.get("seed", 0) + layer)
        idx = select_slow(scores, kk, prefix)
        if options.get("fuse") and prefix + kk < n:
            return fuse_slow(x, scores, idx)
        return _take(x, idx, state)
    if method == "topk-mass":
        probs = attention_probs_slow(q, k, scale)
        mass = probs.sum(-2).mean(1)  # the attention each token receives, summed over queries, head mean
        return _take(x, select_slow(mass, kk, prefix), state)
    if method == "zero-tprune":
        probs = attention_probs_slow(q, k, scale)
        iters = zero_tprune_iterations_slow(layer, depth)
        imp = wpr_slow(probs, iters, 0.01, 0.7)
        drop = min(round(0.5 * (n - prefix - kk)), (n - prefix) // 2)  # half the dropped tokens go to the S-stage
        if drop > 0:
            keep_s = similarity_keep_slow(imp, k.mean(1), drop, prefix, "sequential")
            imp = wpr_slow(probs, iters, 0.01, 0.7, keep_s)
        return _take(x, select_slow(imp, kk, prefix), state)
    if method == "kcenter":
        return _take(x, kcenter_slow(x, kk, prefix), state)
    if method == "divprune":
        return _take(x, divprune_slow(x, kk, prefix), state)
    if method == "tome":
        r = keep if isinstance(keep, R) else n - prefix - kk
        if r == 0 and isinstance(keep, R):
            return x  # ToMe's r = 0: nothing happens
        sizes = state.get("sizes", torch.ones(x.shape[0], n))
        merged, sizes, _positions = tome_merge_slow(k.mean(1), x, sizes, r, prefix)
        state["sizes"] = sizes.float()
        return merged.to(x.dtype)
    raise ValueError(method)


def _size_bias(state):
    """ToMe's proportional attention: log(size) added to every key's logit once tokens merged."""
    return None if "sizes" not in state else state["sizes"].log()[:, None, None, :]


@torch.no_grad()
def eager_timm_vit(model, x, schedule: dict, method="topk-cls", prefix=1, options=None):
    """timm VisionTransformer forward with pruning after the attention of scheduled blocks."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    state = {}
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(x)
        attn = blk.attn
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_size_bias(state)).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(attn.proj(out))
        if i in schedule:
            x = _prune(x, q, k, attn.scale, schedule[i], prefix, method, i, len(model.blocks), state, options)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


@torch.no_grad()
def eager_hand_written(model, x, schedule: dict, method="topk-cls", prefix=2, options=None):
    x = model.embed(x)
    state = {}
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(x)
        a = blk.attn
        q, k, v = a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h))
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if "sizes" in state:
            logits = logits + _size_bias(state)
        b, n, c = h.shape
        x = x + a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
        if i in schedule:
            x = _prune(x, q, k, 1 / math.sqrt(q.shape[-1]), schedule[i], prefix, method, i, len(model.blocks), state, options)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


@torch.no_grad()
def eager_encoder(model, x, schedule: dict, method="topk-cls", prefix=1, options=None):
    x = model.embed(x)
    x = torch.cat([model.cls.expand(x.shape[0], -1, -1), x], dim=1)
    state = {}
    layers = model.encoder.layers
    for i, layer in enumerate(layers):
        sa = layer.self_attn
        b, n, c = x.shape
        heads = sa.num_heads
        q, k, _v = F.linear(x, sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1)
        q = q.view(b, n, heads, c // heads).transpose(1, 2)
        k = k.view(b, n, heads, c // heads).transpose(1, 2)
        bias = _size_bias(state)
        mask = None if bias is None else bias.expand(b, heads, n, n).reshape(b * heads, n, n)
        x = x + layer._sa_block(x, mask, None)
        if i in schedule:
            x = _prune(x, q, k, 1 / math.sqrt(c // heads), schedule[i], prefix, method, i, len(layers), state, options)
        x = layer.norm1(x)
        x = layer.norm2(x + layer._ff_block(x))
    return model.head(x[:, 0])


def random_index(x, layer, keep, prefix, seed=0, valid=None):
    """The random method's kept positions, from its hash written out (select_slow); padding
    (``valid`` False) ranks below every real token."""
    scores = baseline.hash_scores(x.shape[0], x.shape[1], seed + layer)
    if valid is not None:
        scores = torch.where(valid, scores, torch.tensor(-1.0))
    return select_slow(scores, _keep(x.shape[1], prefix, keep), prefix)


@torch.no_grad()
def eager_eva(model, x, layer: int, keep, prefix=1):
    """timm Eva (EVA-02: 2-D rotary positions on the patch tokens) pruned by the random method
    after the attention of block ``layer``; each kept patch keeps its own row of the rope table."""
    x, rope = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    for i, blk in enumerate(model.blocks):
        a = blk.attn(blk.norm1(x), rope=rope)
        x = x + (a if blk.gamma_1 is None else blk.gamma_1 * a)
        if i == layer:
            idx = random_index(x, layer, keep, prefix)
            x = _take(x, idx)
            rope = torch.stack([rope[row[prefix:] - prefix] for row in idx]).unsqueeze(1)  # [B, 1, K, D]
        m = blk.mlp(blk.norm2(x))
        x = x + (m if blk.gamma_2 is None else blk.gamma_2 * m)
    return model.forward_head(model.norm(x))


def _take_square(bias, idx):
    """Rows and columns of a [B|1, H, N, N] bias for each example's kept tokens."""
    bias = bias.expand(idx.shape[0], *bias.shape[1:])
    return torch.stack([bias[b][:, idx[b]][:, :, idx[b]] for b in range(idx.shape[0])])


@torch.no_grad()
def eager_data2vec(model, x, layer: int, keep, prefix=1):
    """HF Data2VecVisionModel (relative-position bias per layer, LayerScale, mean-pooled patches)
    pruned by the random method after the attention of layer ``layer``; the bias keeps the rows
    and columns of the kept tokens."""
    config = model.config
    window = (x.shape[2] // config.patch_size, x.shape[3] // config.patch_size)
    h, _ = model.embeddings(x)
    tokens, idx = h.shape[1], None
    for i, blk in enumerate(model.encoder.layer):
        sa = blk.attention.attention
        bias = sa.relative_position_bias(window, False, dim_size=tokens)  # [1, H, N, N]
        if idx is not None:
            bias = _take_square(bias, idx)
        hn = blk.layernorm_before(h)
        b, n, c = hn.shape
        q, k, v = (f(hn).view(b, n, -1, sa.attention_head_size).transpose(1, 2) for f in (sa.query, sa.key, sa.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, c)
        h = h + blk.lambda_1 * blk.attention.output(out, hn)
        if i == layer:
            idx = random_index(h, layer, keep, prefix)
            h = _take(h, idx)
        h = h + blk.lambda_2 * blk.output(blk.intermediate(blk.layernorm_after(h)))
    seq = model.layernorm(h)
    return seq, model.pooler(seq)


@torch.no_grad()
def eager_t5_encoder(model, ids, mask, layer: int, keep):
    """HF T5EncoderModel (one relative-position bias from block 0 shared by every block, padding
    mask) pruned by the random method after the attention of block ``layer``: bias rows and
    columns and the mask's key entries follow the kept tokens."""
    from transformers.masking_utils import create_bidirectional_mask

    enc = model.encoder
    h = enc.embed_tokens(ids)
    n = ids.shape[1]
    attn_mask = create_bidirectional_mask(config=enc.config, inputs_embeds=h, attention_mask=mask)
    bias = enc.block[0].layer[0].SelfAttention.compute_bias(n, n)
    for i, blk in enumerate(enc.block):
        h = blk.layer[0](h, attention_mask=attn_mask, position_bias=bias)[0]
        if i == layer:
            idx = random_index(h, layer, keep, 0, valid=mask.bool())
            h, bias = _take(h, idx), _take_square(bias, idx)
            attn_mask = None if attn_mask is None else _take_square(attn_mask.expand(-1, -1, n, n), idx)
        h = blk.layer[-1](h)
    return enc.final_layer_norm(h)


@torch.no_grad()
def eager_cait(model, x, layer: int, keep):
    """timm Cait: talking-heads self-attention blocks (no prefix token) pruned by the random
    method after the attention of block ``layer``; the class-attention blocks then put the
    class token in front of the kept patches."""
    x = model.patch_embed(x) + model.pos_embed
    for i, blk in enumerate(model.blocks):
        x = x + blk.gamma_1 * blk.attn(blk.norm1(x))
        if i == layer:
            x = _take(x, random_index(x, layer, keep, 0))
        x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    for blk in model.blocks_token_only:
        cls = blk(x, cls)
    return model.forward_head(model.norm(torch.cat([cls, x], 1)))


@torch.no_grad()
def eager_levit(model, x, stage: int, block: int, layer: int, keep):
    """timm Levit (attention biases per layer, batch norm) pruned by the random method after
    the attention of ``stages[stage].blocks[block]`` (attention layer ``layer``, the random
    method's seed); the biases keep the kept tokens' rows and columns."""
    x = model.stem(x).flatten(2).transpose(1, 2)
    for s in model.stages[:stage]:
        x = s(x)
    st = model.stages[stage]
    x = st.downsample(x)
    idx = None
    for i, blk in enumerate(st.blocks):
        a = blk.attn
        b, n, _ = x.shape
        q, k, v = a.qkv(x).view(b, n, a.num_heads, -1).split([a.key_dim, a.key_dim, a.val_dim], dim=3)
        bias = a.attention_biases[:, a.attention_bias_idxs].unsqueeze(0)
        if idx is not None:
            bias = _take_square(bias, idx)
        attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * a.scale + bias).softmax(-1)
        x = x + a.proj((attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, a.val_attn_dim))
        if i == block:
            idx = random_index(x, layer, keep, 0)
            x = _take(x, idx)
        x = x + blk.mlp(x)
    return model.forward_head(x)


@torch.no_grad()
def eager_llama(model, ids, layer: int, keep):
    """HF LlamaModel (1-D rotary positions from position_ids, causal attention) pruned by the
    random method after the attention of decoder layer ``layer``: each kept token keeps its
    cos/sin row and attends to the kept tokens at or before its original position."""
    x = model.embed_tokens(ids)
    b, n = ids.shape
    pos = torch.arange(n)[None].expand(b, n)
    cos, sin = model.rotary_emb(x, position_ids=pos)
    mask = (pos[:, None, :, None] >= pos[:, None, None, :])
    for i, blk in enumerate(model.layers):
        x = x + blk.self_attn(blk.input_layernorm(x), attention_mask=mask, position_embeddings=(cos, sin))[0]
        if i == layer:
            idx = random_index(x, layer, keep, 0)
            x, cos, sin, pos = (_take(t, idx) for t in (x, cos, sin, pos))
            mask = (pos[:, None, :, None] >= pos[:, None, None, :])
        x = x + blk.mlp(blk.post_attention_layernorm(x))
    return model.norm(x)


EAGER = {"timm_vit": eager_timm_vit, "handwritten_vit": eager_hand_written, "transformer_encoder": eager_encoder}
