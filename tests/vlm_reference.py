"""Eager references for visual-token pruning in VLM tests, written from the papers (they do not
call ``tpc.methods`` or ``tpc.vlm``): which visual tokens each method keeps, and the stock
decoder layers run on the kept tokens only."""

from __future__ import annotations

import torch


def visual_positions(input_ids, image):
    return [torch.nonzero(row == image)[:, 0] for row in input_ids]


def with_text(input_ids, image, chosen_visual):
    """Sorted kept positions: every non-visual token plus the chosen visual positions."""
    rows = []
    for ids, chosen in zip(input_ids, chosen_visual):
        keep = ids != image
        keep[chosen] = True
        rows.append(torch.nonzero(keep)[:, 0])
    return torch.stack(rows)


def fastv_kept(attention, input_ids, image, keep):
    """FastV (Chen et al., 2024): the last prompt token's attention at layer K ([B, H, S, S]
    weights of the eager model), head mean, top-k visual tokens; text kept."""
    scores = attention[:, :, -1].mean(1)
    chosen = [pos[scores[b, pos].topk(keep).indices] for b, pos in enumerate(visual_positions(input_ids, image))]
    return with_text(input_ids, image, chosen)


def divprune_loop(x, k):
    """DivPrune (Alvar et al., 2025): greedy max-min diversity, d = 1 - cos."""
    x = torch.nn.functional.normalize(x, dim=-1)
    d = 1 - x @ x.T
    n = len(x)
    first = max(range(n), key=lambda i: min(d[i, j] for j in range(n) if j != i))
    picked = [first]
    while len(picked) < k:
        picked.append(max((i for i in range(n) if i not in picked), key=lambda i: min(d[i, j] for j in picked)))
    return torch.tensor(sorted(picked))


def kcenter_loop(x, k):
    """Greedy k-center (Gonzalez): first the token farthest from the mean, then farthest-point."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    d = 1 - unit @ unit.T
    mean = torch.nn.functional.normalize(x.mean(0), dim=0)
    picked = [int((1 - unit @ mean).argmax())]
    while len(picked) < k:
        far = d[:, picked].min(1).values.masked_fill(torch.isin(torch.arange(len(x)), torch.tensor(picked)), -1)
        picked.append(int(far.argmax()))
    return torch.tensor(sorted(picked))


def diverse_kept(select, embeds, input_ids, image, keep):
    """The visual tokens ``select`` (divprune_loop / kcenter_loop) keeps from each example's features."""
    chosen = [pos[select(embeds[b, pos], keep)] for b, pos in enumerate(visual_positions(input_ids, image))]
    return with_text(input_ids, image, chosen)


def expected_kept(select, embeds, input_ids, image, keep, graph_kept):
    """What a method before the LM must keep: the loop ``select``'s choice, or for ``random``
    (``select`` None, no paper to follow) the graph's own draw once checked to be every
    non-visual token and ``keep`` visual ones per example, in order."""
    if select is not None:
        return diverse_kept(select, embeds, input_ids, image, keep)
    visual = input_ids.gather(1, graph_kept) == image
    assert (visual.sum(1) == keep).all() and ((~visual).sum(1) == (input_ids != image).sum(1)).all()
    assert (graph_kept.diff(dim=1) > 0).all()
    return graph_kept


def eager_from(lm, head, hidden, kept, first_layer, attention_mask, positions):
    """The stock decoder layers from ``first_layer`` on, run on the kept tokens only: their
    original positions ([B, S], or [3, B, S] M-RoPE, gathered), causal order, padding masked."""
    am = attention_mask.bool().gather(1, kept)
    positions = positions.gather(-1, kept.expand(*positions.shape[:-2], *kept.shape))
    h = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
    n = kept.shape[1]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & am[:, None, None, :]
    with torch.no_grad():
        rotary = lm.rotary_emb(h, positions)
        for layer in lm.layers[first_layer:]:
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
        return head(lm.norm(h))


def real(attention_mask, kept):
    """Which kept tokens are real prompt tokens (not padding)."""
    return attention_mask.bool().gather(1, kept)


def check_golden(gm, name, update):
    """The rewritten graph's text against tests/golden/<name>.txt (B and S for the symbolic sizes)."""
    from pathlib import Path

    from tpc.graph.printing import format_rewrites

    batch, seq = next(iter(gm.graph.find_nodes(op="placeholder", target="input_ids"))).meta["val"].shape
    text = format_rewrites(gm, {str(batch): "B", str(seq): "S"})
    path = Path(__file__).parent / "golden" / f"{name}.txt"
    if update:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"
