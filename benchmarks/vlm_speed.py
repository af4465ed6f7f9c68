"""Prefill and decode-step speed of a pruned LLaVA against the unpruned one, side by side.

A LLaVA-1.5-shaped language model at reduced depth (Llama: hidden 1024, 16 heads, 8 decoder
layers, MLP 2752, vocabulary 32000; random weights) behind a one-layer CLIP tower at 336 px /
patch 14, so each image is 576 visual tokens; prompts are 576 visual + 64 text tokens. For
every method at 25 % of the visual tokens kept it prints the prefill FLOPs ratio (aten ops
executed, counted by torch's FlopCounterMode, which on the CPU sees neither the SDPA attention
nor the tpc:: scoring ops; ``tpc bench`` counts both, docs/benchmarks.md), the
measured prefill speedup (torch, CPU; speedup × FLOPs ratio ≥ 0.9 means the latency
follows the FLOPs), and one decode step's latency (median, side by side) and KV-cache bytes with the pruned cache against the
unpruned one.

    python benchmarks/vlm_speed.py [--threads 1] [--iters 3] [--repeats 3]

The same model through the CLI (tpc's counted FLOPs, both prefills through ``VlmModule.prefill``):

    tpc bench benchmarks.vlm_speed:model --pass fastv --layers 1 --keep 0.25 --batch 1
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tpc.timing import time_pair
from tpc.vlm import capture_prefill, prune
from tpc.vlm.bench import decode_step, kv_bytes
from tpc.vlm.inputs import prompt_positions

IMAGE = 31999
VISUAL, TEXT = 576, 64


def llava_15_shaped() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                         attn_implementation="sdpa")
    return LlavaForConditionalGeneration(config).eval()


def prompts(batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 31000, (batch, TEXT), generator=gen)
    ids = torch.cat([ids[:, :8], torch.full((batch, VISUAL), IMAGE), ids[:, 8:]], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=gen)}


def model() -> tuple[LlavaForConditionalGeneration, dict]:
    """The model and one prompt, for ``tpc bench benchmarks.vlm_speed:model`` (docs/benchmarks.md)."""
    return llava_15_shaped(), prompts(1)


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llava = llava_15_shaped()
    inputs = prompts(2)
    one = {k: v[:1] for k, v in inputs.items()}
    program = capture_prefill(llava, inputs)
    unpruned = program.module()  # the captured prefill, not rewritten
    example = (one["input_ids"], one["pixel_values"], one["attention_mask"], prompt_positions(one["attention_mask"]))

    def run_base():
        with torch.no_grad():
            return unpruned(*example)

    base_flops = flops(run_base)
    base_state = prune(llava, program, inputs, method="random", keep=1.0).prefill(**one)  # the full cache
    print(f"LLaVA-1.5-shaped LM (hidden 1024, 16 heads, 8 layers), {VISUAL} visual + {TEXT} text tokens, batch 1, "
          f"torch CPU, {args.threads} thread(s)")
    print(f"{'method':<10} {'where':<16} {'FLOPs ratio':>11} {'prefill speedup':>15} {'(min-max)':>13} "
          f"{'speedup*FLOPs':>13} {'decode ms':>15} {'KV cache MB':>15}")
    for method, layers in (("fastv", 1), ("divprune", None), ("kcenter", None), ("random", None), ("random", 1)):
        pruned = prune(llava, program, inputs, method=method, layers=layers, keep=0.25)
        state = pruned.prefill(**one)
        ratio = flops(lambda: pruned.prefill(**one)) / base_flops
        timing = time_pair(run_base, lambda: pruned.prefill(**one), 1, warmup=1,
                           iters=args.iters, repeats=args.repeats)
        decode = time_pair(decode_step(llava, base_state), decode_step(llava, state), 1, warmup=1, iters=5,
                           repeats=args.repeats)
        where = "before the LM" if layers is None else f"after layer {layers}"
        print(f"{method:<10} {where:<16} {ratio:>11.3f} {timing.speedup:>14.2f}x "
              f"{timing.speedup_spread[0]:>6.2f}-{timing.speedup_spread[1]:<6.2f} {timing.speedup * ratio:>13.2f} "
              f"{decode.base.median_ms:>6.1f} -> {decode.pruned.median_ms:<6.1f} "
              f"{kv_bytes(base_state) / 2**20:>6.1f} -> {kv_bytes(state) / 2**20:<6.1f}")


if __name__ == "__main__":
    main()
