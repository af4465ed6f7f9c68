"""kvpress's presses on SmolLM2-135M-Instruct, on the passkey prompts of ``kvcache_smollm2.py``: the
side-by-side comparison of tpc's compressed KV cache with NVIDIA's kvpress (docs/decode.md).

    python benchmarks/kvpress_passkey.py setup          # kvpress 0.5.5 in its own virtual environment
    python benchmarks/kvpress_passkey.py run --lengths 1024 --prompts 3 --budgets 64,128,256,512
    python benchmarks/kvcache_smollm2.py --lengths 1024 --prompts 3 --budgets 64,128,256,512   # tpc's side

kvpress pins ``transformers>=4.56,<5.3`` (tpc's is 5.24), so it lives in a virtual environment of its
own (``--venv``, default ``~/.cache/tpc/kvpress-venv``), never in tpc's; ``run`` re-executes itself
with that environment's Python. Each press is wrapped around the stock ``model.generate()`` (greedy,
8 new tokens), the question inside the prompt, as a user calls it; a budget of B positions is the
press's ``compression_ratio`` (L - B) / L of a prompt of L tokens. The presses named as tpc's
methods: ``streaming`` = ``StreamingLLMPress`` (4 sinks, as tpc), ``snapkv`` = ``SnapKVPress``
(window 64, kernel 5: kvpress's defaults; tpc's window is 32), ``h2o`` = ``ObservedAttentionPress``
(attention accumulated over the prompt; needs eager attention). kvpress has no Scissorhands press.
kvpress compresses once, after the prompt; tpc's ``streaming``, ``h2o`` and ``scissorhands`` also
evict while decoding (8 tokens here). The KV bytes are those the cache holds after ``generate()``.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_smollm2 import DEFAULT, passkey_prompt  # noqa: E402

VENV = Path.home() / ".cache" / "tpc" / "kvpress-venv"
PINS = ["kvpress==0.5.5", "transformers==5.2.0", "torch==2.14.1", "accelerate", "safetensors"]
PRESSES = {"streaming": ("StreamingLLMPress", "sdpa"), "snapkv": ("SnapKVPress", "sdpa"),
           "h2o": ("ObservedAttentionPress", "eager")}


def setup(venv: Path) -> None:
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PINS], check=True)
    print(f"kvpress installed in {venv}")


def run(args) -> None:
    import torch
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    models = {attn: AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation=attn).eval()
              for attn in {PRESSES[m][1] for m in args.methods.split(",")}}
    budgets = [int(v) for v in args.budgets.split(",")]
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, load average at start "
          f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)
    for length in [int(v) for v in args.lengths.split(",")]:
        rng, hits, sizes = random.Random(length), {}, {}
        for _ in range(args.prompts):
            ids, key = passkey_prompt(tokenizer, length, rng)
            for method in args.methods.split(","):
                name, attn = PRESSES[method]
                model = models[attn]
                for budget in budgets:
                    press = getattr(kvpress, name)(compression_ratio=(ids.shape[1] - budget) / ids.shape[1])
                    with press(model):
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                             do_sample=False, return_dict_in_generate=True)
                    text = tokenizer.decode(out.sequences[0, ids.shape[1]:])
                    hits[(method, budget)] = hits.get((method, budget), 0) + (key in text)
                    sizes[(method, budget)] = sum(t.nbytes for layer in out.past_key_values.layers
                                                  for t in (layer.keys, layer.values))
        print(f"{ids.shape[1]} tokens, {args.prompts} prompts; load average {os.getloadavg()[0]:.1f}", flush=True)
        for method in args.methods.split(","):
            print(f"  kvpress {PRESSES[method][0]} ({method}): " + ", ".join(
                f"{b} {hits[(method, b)]}/{args.prompts} ({sizes[(method, b)] / 2**20:.2f} MiB)" for b in budgets),
                flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["setup", "run"])
    parser.add_argument("--venv", type=Path, default=VENV, help="kvpress's own virtual environment")
    parser.add_argument("--out", type=Path, default=DEFAULT, help="the converted model directory")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--methods", default="streaming,snapkv,h2o")
    args = parser.parse_args()
    if args.command == "setup":
        setup(args.venv)
        return
    python = args.venv / "bin" / "python"
    if Path(sys.prefix).resolve() != args.venv.resolve():
        if not python.is_file():
            raise SystemExit(f"no kvpress environment at {args.venv}: run `python {sys.argv[0]} setup` first")
        os.execv(python, [str(python), *sys.argv])
    run(args)


if __name__ == "__main__":
    main()
