"""One decode step of a rewritten causal LM in ONNX Runtime against the same step in torch, side by side
(interleaved repeats, one thread each), on the tests' tiny seeded Llama (4 layers, hidden 32, 4 query /
2 KV heads of width 8) or a wider one, at random caches: dense, tidal and quest steps, each written
with ``DecodeModule.save("….onnx")`` (checked in ONNX Runtime before it is written).

Run from the repository root:  python benchmarks/decode_onnx.py [--context 1024] [--batch 1,4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from tpc.decode import capture_step, compile_decoder
from tpc.decode.export import step_inputs
from tpc.exports.onnxruntime import make_session
from tpc.timing import machine_name, time_pair


def tiny(hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1 << 16, attn_implementation="sdpa", pad_token_id=0,
                                      eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny(args.hidden, args.layers)
    program = capture_step(model)
    steps = {"dense": compile_decoder(model, layers=[1], keep=args.keep, program=program).unpruned(),
             "tidal": compile_decoder(model, layers=[1], keep=args.keep, program=program),
             "quest": compile_decoder(model, method="quest", keep=args.keep, options={"page": 16}, program=program)}
    print(f"torch {torch.__version__} vs ONNX Runtime on {machine_name()}, 1 thread each; Llama hidden "
          f"{args.hidden}, {args.layers} layers; {args.context} cached positions, keep {args.keep}; "
          f"{args.repeats} interleaved repeats of {args.iters} steps\n")
    print("| step | batch | torch ms | ONNX Runtime ms | torch / ORT (spread) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in steps.items():
            path = Path(tmp) / f"{name}.onnx"
            module.save(path)
            session = make_session(str(path), threads=1)
            names = [i.name for i in session.get_inputs()]
            for batch in map(int, args.batch.split(",")):
                inputs = step_inputs(module, batch, args.context, padding=args.context // 4)
                feeds = {n: x.numpy() for n, x in zip(names, torch.utils._pytree.tree_leaves(inputs))}
                t = time_pair(lambda: module.step(*inputs), lambda: session.run(None, feeds), batch,
                              iters=args.iters, repeats=args.repeats)
                print(f"| {name} | {batch} | {t.base.median_ms:.3f} | {t.pruned.median_ms:.3f} | "
                      f"{t.speedup:.2f}x ({t.speedup_spread[0]:.2f}-{t.speedup_spread[1]:.2f}) |", flush=True)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)
