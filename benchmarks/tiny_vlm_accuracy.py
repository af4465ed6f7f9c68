"""Answer accuracy of the trained tiny LLaVA under visual-token pruning, with prefill FLOPs and latency ratios.

The model is benchmarks/train_tiny_vlm.py's (trained there first, once, when its directory
is missing). On CIFAR-10 images 8000–9999 of ../shared/data/cifar10_test.npz, each image gets
both questions ("what is in the picture ?" → its class; "is there a {class} ?" → yes / no,
half yes, the "no" classes uniform over the other nine, a fixed seeded draw): 4,000 prompts.
The answer is the first answer token, greedy: the argmax over the whole vocabulary of the
last prompt position's logits from tpc's pruned prefill (``VlmModule.prefill``), which is the
first token ``VlmModule.generate`` emits (checked on a batch). The unpruned model is the stock
``LlavaForConditionalGeneration`` forward.

Methods, at 50 / 25 / 10 % of the 64 visual tokens kept (32 / 16 / 7): stage 1 (before the
language model) divprune, kcenter, random, topk-cls (VTC-CLS, the tower's [CLS] attention at
its feature layer); stage 2 (after decoder layer 0 of 3) fastv, divprune, kcenter, random.
``random`` keeps the same seeded draw of patch positions for every image; it is run with
seeds 0, 1, 2 and reported as their mean (and range). One more row drops every visual token
after layer 0 (``keep=0``, ToDRE's second stage): what the later layers still read from them.

FLOPs ratio: multiply-adds of the pruned prefill graph over the unpruned one, counted on the
graphs by ``tpc.vlm.prefill_flops`` at batch 1 and the 71-token "what" prompt (vision tower
and projector included; the scorers FastV's query row and VTC-CLS's [CLS] row included,
divprune's and kcenter's greedy selections not). Latency ratio: pruned prefill over the
captured unpruned prefill, timed side by side, interleaved (``tpc.timing.time_pair``), at
batch 16, torch on the CPU.

    python benchmarks/tiny_vlm_accuracy.py accuracy     # about 20 min on a shared machine; resumes from accuracy.json
    OMP_NUM_THREADS=2 python benchmarks/tiny_vlm_accuracy.py latency \
        --batch 16 --threads 1 --iters 10 --repeats 5
    python benchmarks/tiny_vlm_accuracy.py report       # the table and docs/tiny_vlm_accuracy.png

``accuracy`` and ``latency`` write JSON beside the model (benchmarks/tiny_vlm/); ``report``
reads both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import train_tiny_vlm as tiny  # noqa: E402

EVAL = range(8000, 10000)
KEEPS = (0.5, 0.25, 0.1)
STAGE2_LAYER = 0
RANDOM_SEEDS = (0, 1, 2)
STAGE1 = ("divprune", "kcenter", "random", "topk-cls")
STAGE2 = ("fastv", "divprune", "kcenter", "random")
PNG = Path(__file__).resolve().parents[1] / "docs" / "tiny_vlm_accuracy.png"
BATCH = 250
# every visual token dropped after layer 0 (ToDRE's second stage): how much the later layers still read the image
DROP_ALL = dict(stage=2, method="random", layers=STAGE2_LAYER, keep=0, seed=0)


def configs() -> list[dict]:
    out = []
    for stage, methods, layers in ((1, STAGE1, None), (2, STAGE2, STAGE2_LAYER)):
        for method in methods:
            for seed in (RANDOM_SEEDS if method == "random" else (0,)):
                out += [dict(stage=stage, method=method, layers=layers, keep=keep, seed=seed) for keep in KEEPS]
    return out + [DROP_ALL]


def name(c: dict) -> str:
    return f"stage{c['stage']}-{c['method']}-{c['keep']}-seed{c['seed']}"


def model_and_tokenizer(path: Path):
    if not (path / "config.json").exists():
        print(f"no trained model at {path}: training it first (benchmarks/train_tiny_vlm.py)", flush=True)
        tiny.train(path)
    return tiny.load(path)


def eval_set(tok) -> list[tuple[dict, torch.Tensor]]:
    """Batches of processor outputs (one question type per batch: no padding) and the answer token ids."""
    images, labels = tiny.load_data(EVAL)
    questions, answers = tiny.eval_questions(labels)
    n = len(labels)
    images = np.concatenate([images, images])
    answer_ids = torch.tensor(tok.convert_tokens_to_ids(answers))
    return [(tiny.processor(tok, images[i:i + BATCH], questions[i:i + BATCH]), answer_ids[i:i + BATCH])
            for start in (0, n) for i in range(start, start + n, BATCH)]


def example(tok) -> dict:
    images, labels = tiny.load_data(range(EVAL.start, EVAL.start + 2))
    return tiny.processor(tok, images, [tiny.WHAT] * 2)


def prune(model, program, inputs, c: dict):
    from tpc.vlm import prune as tpc_prune

    return tpc_prune(model, program, inputs, method=c["method"], layers=c["layers"], keep=c["keep"], seed=c["seed"])


def score(answer_fn, batches) -> dict:
    """Accuracy per question type (batches hold one type each: the first half 'what', then 'is there')."""
    right = {"what": 0, "is_there": 0}
    total = dict.fromkeys(right, 0)
    half = len(batches) // 2
    for i, (inputs, answers) in enumerate(batches):
        kind = "what" if i < half else "is_there"
        right[kind] += int((answer_fn(inputs) == answers).sum())
        total[kind] += len(answers)
    out = {k: right[k] / total[k] for k in right}
    out["both"] = sum(right.values()) / sum(total.values())
    return out


def accuracy(path: Path) -> None:
    from tpc.vlm import capture_prefill, prefill_flops

    model, tok = model_and_tokenizer(path)
    batches = eval_set(tok)
    inputs = example(tok)
    program = capture_prefill(model, inputs)
    tokens = inputs["input_ids"].shape[1]
    base_flops = prefill_flops(program.module(), tokens).total

    def stock(x):
        with torch.no_grad():
            return model(**x).logits[:, -1].argmax(-1)

    start = time.perf_counter()
    saved = path / "accuracy.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}  # a run resumes: configs done are kept
    if "unpruned" not in results:
        results["unpruned"] = {**score(stock, batches), "flops": base_flops}
    print(f"unpruned: {results['unpruned']} ({time.perf_counter() - start:.0f} s)", flush=True)
    check = batches[len(batches) // 2]  # an is-there batch: generate()'s first token is the prefill's argmax
    for c in configs():
        if name(c) in results:
            continue
        pruned = prune(model, program, inputs, c)
        first = pruned.generate(**check[0], max_new_tokens=2)[:, check[0]["input_ids"].shape[1]]
        assert torch.equal(first, pruned.prefill(**check[0]).logits[:, -1].argmax(-1)), name(c)
        results[name(c)] = {**c, **score(lambda x: pruned.prefill(**x).logits[:, -1].argmax(-1), batches),
                            "flops": prefill_flops(pruned.gm, tokens).total}
        print(f"{name(c)}: {results[name(c)]} ({time.perf_counter() - start:.0f} s)", flush=True)
        saved.write_text(json.dumps(results, indent=1) + "\n")


def latency(path: Path, batch: int, iters: int, repeats: int) -> None:
    from tpc.timing import time_pair
    from tpc.vlm import capture_prefill
    from tpc.vlm.family import family_of

    model, tok = model_and_tokenizer(path)
    images, labels = tiny.load_data(range(EVAL.start, EVAL.start + batch))
    inputs = tiny.processor(tok, images, [tiny.WHAT] * batch)
    program = capture_prefill(model, example(tok))
    unpruned = program.module()
    args, _ = family_of(model).graph_args(inputs)

    def base():
        with torch.no_grad():
            return unpruned(*args)

    print(f"uptime before: {uptime()}", flush=True)
    results = {"batch": batch, "threads": torch.get_num_threads(), "uptime_before": uptime()}
    for c in configs():
        if c["seed"] != 0:
            continue
        pruned = prune(model, program, example(tok), c)
        timing = time_pair(base, lambda: pruned.prefill(**inputs), batch, warmup=1, iters=iters, repeats=repeats)
        results[name(c)] = {"base_ms": timing.base.median_ms, "pruned_ms": timing.pruned.median_ms,
                            "ratio": 1 / timing.speedup, "speedup_spread": timing.speedup_spread}
        print(f"{name(c)}: {timing.base.median_ms:.1f} ms -> {timing.pruned.median_ms:.1f} ms "
              f"(ratio {1 / timing.speedup:.3f})", flush=True)
    results["uptime_after"] = uptime()
    print(f"uptime after: {results['uptime_after']}", flush=True)
    (path / "latency.json").write_text(json.dumps(results, indent=1) + "\n")


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rows(acc: dict, lat: dict) -> list[dict]:
    """One row per (stage, method, keep); random: the mean over its seeds, with the range."""
    out = []
    base = acc["unpruned"]
    for c in configs():
        if c["seed"] != 0 or name(c) not in acc:
            continue
        seeds = RANDOM_SEEDS if c["method"] == "random" and c["keep"] > 0 else (0,)
        runs = [acc[name({**c, "seed": s})] for s in seeds]
        row = {**c, "kept": int(np.ceil(c["keep"] * tiny.VISUAL)), "flops_ratio": runs[0]["flops"] / base["flops"]}
        for kind in ("what", "is_there", "both"):
            row[kind] = statistics.mean(r[kind] for r in runs)
            row[kind + "_range"] = (min(r[kind] for r in runs), max(r[kind] for r in runs))
        row["latency_ratio"] = lat.get(name(c), {}).get("ratio") if lat else None
        out.append(row)
    return out


def report(path: Path) -> None:
    acc = json.loads((path / "accuracy.json").read_text())
    lat_path = path / "latency.json"
    lat = json.loads(lat_path.read_text()) if lat_path.exists() else {}
    table = rows(acc, lat)
    base = acc["unpruned"]
    print(f"| stage | method | visual tokens kept | what (class) | is there (yes/no) | both | FLOPs ratio | "
          f"latency ratio (batch {lat.get('batch', '-')}) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| — | unpruned | 64 | {base['what']:.1%} | {base['is_there']:.1%} | {base['both']:.1%} | 1.000 | 1.000 |")
    for r in table:
        if r["keep"] == 0:
            print(f"| 2 (after layer {STAGE2_LAYER}) | every visual token dropped | 0 | {r['what']:.1%} | "
                  f"{r['is_there']:.1%} | {r['both']:.1%} | {r['flops_ratio']:.3f} | "
                  f"{'—' if r['latency_ratio'] is None else format(r['latency_ratio'], '.3f')} |")
            continue
        where = "1 (before the LM)" if r["stage"] == 1 else f"2 (after layer {STAGE2_LAYER})"
        spread = "" if r["method"] != "random" else f" ({r['both_range'][0]:.1%}–{r['both_range'][1]:.1%})"
        latency_text = "—" if r["latency_ratio"] is None else f"{r['latency_ratio']:.3f}"
        print(f"| {where} | {r['method']} | {r['kept']} ({r['keep']:.0%}) | {r['what']:.1%} | {r['is_there']:.1%} | "
              f"{r['both']:.1%}{spread} | {r['flops_ratio']:.3f} | {latency_text} |")
    plot(table, base)


def plot(table: list[dict], base: dict) -> None:
    from tpc.exports.atomic import atomic_output
    from tpc.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    table = [r for r in table if r["keep"] > 0]
    lines = dict.fromkeys((r["stage"], r["method"]) for r in table)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for _, m in lines))}
    for stage, method in lines:
        pts = sorted((r["kept"], r["both"]) for r in table if (r["stage"], r["method"]) == (stage, method))
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o" if stage == 1 else "s",
                linestyle="-" if stage == 1 else "--", color=colors[method],
                label=f"{method} ({'before the LM' if stage == 1 else f'after layer {STAGE2_LAYER}'})")
    ax.axhline(100 * base["both"], color="black", linewidth=1, label="unpruned (64 tokens)")
    ax.set_xlabel("visual tokens kept (of 64)")
    ax.set_ylabel("answer accuracy, both questions (%)")
    ax.set_xticks([int(np.ceil(k * tiny.VISUAL)) for k in KEEPS])
    ax.set_title("Trained tiny LLaVA (CIFAR-10 ViT tower), images 8000-9999")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_output(PNG) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    print(f"wrote {PNG}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("accuracy", "latency", "report"))
    parser.add_argument("--model", type=Path, default=tiny.CACHE, help="the trained model's directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="latency: prompts per prefill")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "accuracy":
        accuracy(args.model)
    elif args.part == "latency":
        latency(args.model, args.batch, args.iters, args.repeats)
    else:
        report(args.model)


if __name__ == "__main__":
    main()
