"""tpc's ``tome`` against ToMe's own code (facebookresearch/ToMe, ``tome.patch.timm``,
proportional attention on), side by side on the same inputs: tokens per layer and the largest
logit difference, with r at every layer as ToMe applies it.

ToMe is not on PyPI: pass the path to a checkout of facebookresearch/ToMe (its code is imported
from there, never copied into tpc); without one the script says so and exits 0. Run from the
repository root:

    python benchmarks/tome_parity.py --tome /path/to/ToMe [--models cifar,deit_s,vit_l,layerscale] [--r 2,4,8,16]

Models: the trained CIFAR-10 ViT in ../shared/data on 256 test images; random-weight DeiT-S and
ViT-L (timm) on 4 random images; a random-weight DeiT-III-S, a LayerScale ViT (its LayerScale
set to 0.1 so it matters), where ToMe's patched block drops the LayerScale multiplies.

Shim (here, not in tpc): ToMe's ``ToMeBlock.forward`` is timm's pre-LayerScale block. For the
LayerScale model the script also runs ``ToMeBlockWithLayerScale``, ToMe's block forward with
timm's ``ls1``/``ls2`` put back, to show that tpc computes ToMe's algorithm on the model as it
is. With timm 1.0.31 ToMe's patch needs no other shim for these models (their blocks are
called as ``block(x)``, their attention has no q/k norm, gate or output norm).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tpc  # noqa: E402
from benchmarks.cifar_vit import DATA, MEAN, STD  # noqa: E402
from benchmarks.cifar_vit import model as cifar_model  # noqa: E402


def load_tome(path: str | None):
    """ToMe's package from a checkout, or None (with the reason printed)."""
    if not path or not (Path(path) / "tome" / "patch" / "timm.py").is_file():
        print(f"skipped: no ToMe checkout{f' at {path}' if path else ''}; pass --tome PATH to a checkout of "
              "facebookresearch/ToMe (git clone https://github.com/facebookresearch/ToMe)")
        return None
    sys.path.insert(0, str(Path(path).resolve()))
    import tome

    return tome


def layerscale_block_class(tome):
    """ToMe's ToMeBlock with timm's LayerScale put back (the shim described above)."""

    class ToMeBlockWithLayerScale(importlib.import_module("tome.patch.timm").ToMeBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            info = self._tome_info
            x_attn, metric = self.attn(self.norm1(x), info["size"] if info["prop_attn"] else None)
            x = x + self._drop_path1(self.ls1(x_attn))
            r = info["r"].pop(0)
            if r > 0:
                merge, _ = tome.merge.bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
                x, info["size"] = tome.merge.merge_wavg(merge, x, info["size"])
            return x + self._drop_path2(self.ls2(self.mlp(self.norm2(x))))

    return ToMeBlockWithLayerScale


def tome_run(tome, model, x, r, keep_layerscale=False):
    """(logits, tokens each block's attention saw) of ToMe's patched copy of ``model``."""
    patched = copy.deepcopy(model)
    tome.patch.timm(patched)
    if keep_layerscale:
        cls = layerscale_block_class(tome)
        for blk in patched.blocks:
            blk.__class__ = cls
    patched.r = r
    tokens = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: tokens.append(args[0].shape[1])) for blk in patched.blocks]
    with torch.no_grad():
        out = patched(x)
    for h in hooks:
        h.remove()
    return out, tokens


def cifar():
    if not DATA.is_file():
        return None
    data = np.load(DATA)
    images = torch.from_numpy(data["images"][:256]).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return cifar_model()[0], images


def random_images(size: int, batch: int = 4):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def timm_random(name: str, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def layerscale_model():
    net = timm_random("deit3_small_patch16_224")
    with torch.no_grad():
        for blk in net.blocks:
            blk.ls1.gamma.fill_(0.1)
            blk.ls2.gamma.fill_(0.1)
    return net


MODELS = {
    "cifar": ("CIFAR-10 ViT (trained, 256 test images)", cifar),
    "deit_s": ("DeiT-S (random weights)", lambda: (timm_random("deit_small_patch16_224"), random_images(224))),
    "vit_l": ("ViT-L/16 (random weights)", lambda: (timm_random("vit_large_patch16_224"), random_images(224))),
    "layerscale": ("DeiT-III-S, LayerScale 0.1 (random weights)", lambda: (layerscale_model(), random_images(224))),
}


def tokens_text(tokens: list[int]) -> str:
    return ",".join(map(str, tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tome", help="path to a checkout of facebookresearch/ToMe")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--r", default="2,4,8,16", help="ToMe's r at every layer, comma-separated values")
    args = parser.parse_args(argv)
    tome = load_tome(args.tome)
    if tome is None:
        return 0
    rs = [int(v) for v in args.r.split(",")]
    print("| model | r | tokens per layer (tpc = ToMe) | max abs logit diff, tpc vs ToMe | max abs logit | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for key in args.models.split(","):
        title, make = MODELS[key]
        loaded = make()
        if loaded is None:
            print(f"| {title} | skipped: {DATA} not found | | | | |")
            continue
        net, x = loaded
        with torch.no_grad():
            plain = net(x)
        scale = plain.abs().max().item()
        for r in rs:
            pm = tpc.compile(net, (x[:2],), method="tome", r=r)
            got = pm(x)
            want, tome_tokens = tome_run(tome, net, x, r)
            ours = [s.tokens for s in pm.report.sites]
            same = "same" if ours == tome_tokens else f"DIFFER: ToMe {tokens_text(tome_tokens)}"
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            row = f"| {title} | {r} | {tokens_text(ours)} ({same}) | {(got - want).abs().max().item():.1e} | {scale:.3g} | {agree:.1%} |"
            if key == "layerscale":
                fixed, _ = tome_run(tome, net, x, r, keep_layerscale=True)
                row = (f"| {title}, ToMe as shipped (drops LayerScale) | {r} | {tokens_text(ours)} ({same}) | "
                       f"{(got - want).abs().max().item():.1e} | {scale:.3g} | {agree:.1%} |\n"
                       f"| {title}, ToMe + LayerScale shim | {r} | {tokens_text(ours)} | "
                       f"{(got - fixed).abs().max().item():.1e} | {scale:.3g} | "
                       f"{(got.argmax(-1) == fixed.argmax(-1)).float().mean().item():.1%} |")
            print(row, flush=True)
        if key == "layerscale":
            shipped, _ = tome_run(tome, net, x, 0)
            print(f"| {title}: ToMe's patch at r = 0 vs the model itself | 0 | no merge | "
                  f"{(shipped - plain).abs().max().item():.1e} | {scale:.3g} | "
                  f"{(shipped.argmax(-1) == plain.argmax(-1)).float().mean().item():.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
