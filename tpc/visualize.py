"""``tpc visualize``: which patches each pruning layer keeps, drawn on the image.

One panel for the input and one per pruning layer; the patches a layer (or an earlier one)
dropped are filled with flat grey, as ToMe's and EViT's figures show their selections. For
merges (ToMe) a merged-away token counts as dropped; its patch lives on in the token it joined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx

import tpc
from tpc import models
from tpc.dataset import parse_floats, resize_crop
from tpc.errors import TpcError
from tpc.exports.atomic import atomic_output, check_output_path, refuse_overwriting
from tpc.passes.compaction import compactions
from tpc.registry import DEFAULT_METHOD
from tpc.vlm.family import refuse_vlm

GREY = (128, 128, 128)
MIN_PANEL = 224
LABEL_HEIGHT = 18


@dataclass
class Visualization:
    path: str
    grid: tuple[int, int]
    patch: int
    kept: list[int]  # patches (non-prefix tokens) still present after each pruning layer
    layers: list[int]


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """An RGB image as uint8 [3, H, W], short side resized and centre-cropped to ``size``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise TpcError(f"image {str(path)!r} is a directory: give one image file")
    if not path.is_file():
        raise TpcError(f"image {str(path)!r} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise TpcError(f"cannot read {str(path)!r} as an image: {err}") from None
    h, w = size
    if img.height < h or img.width < w:
        raise TpcError(f"image {str(path)!r} is {img.width}x{img.height} but the model takes {w}x{h}: give an image at least that large")
    return resize_crop(img, size)


def kept_positions(gm: fx.GraphModule, inputs: tuple) -> tuple[list[int], list[torch.Tensor]]:
    """(layers, original token positions kept after each compaction) for the first example."""
    wanted = {c.index: c.layer for c in compactions(gm)}
    seen: dict[int, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in wanted:
                seen[wanted[node]] = out[0].detach().clone()
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    layers = sorted(seen)
    positions, current = [], None
    for layer in layers:
        index = seen[layer]
        current = index if current is None else current[index]
        positions.append(current)
    return layers, positions


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=1).repeat(factor, axis=2)


def render(image: np.ndarray, positions: list[torch.Tensor], layers: list[int], prefix: int, grid: tuple[int, int],
           tokens: int, out: str | Path) -> Visualization:
    from PIL import Image, ImageDraw

    c, h, w = image.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    factor = max(1, -(-MIN_PANEL // max(h, w)))
    panels, kept_counts = [("input", image)], []
    for layer, pos in zip(layers, positions):
        keep = np.zeros(gh * gw, dtype=bool)
        patches = pos[pos >= prefix] - prefix
        keep[patches.numpy()] = True
        panel = image.copy()
        for p in np.flatnonzero(~keep):
            r, q = divmod(int(p), gw)
            panel[:, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw] = np.array(GREY, dtype=np.uint8)[:, None, None]
        kept_counts.append(int(keep.sum()))
        panels.append((f"after layer {layer}: {int(keep.sum()) + prefix}/{tokens} tokens", panel))
    width, height = w * factor, h * factor
    canvas = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, panel) in enumerate(panels):
        canvas.paste(Image.fromarray(_upscale(panel, factor).transpose(1, 2, 0)), (i * width, LABEL_HEIGHT))
        draw.text((i * width + 4, 3), label, fill=(0, 0, 0))
    with atomic_output(out) as tmp:
        canvas.save(tmp, format="PNG")
    return Visualization(str(out), grid, ph, kept_counts, layers)


def run_visualize(model_id, image_path, out, method=DEFAULT_METHOD, layers=None, keep=None, mean=None, std=None,
                  load_kwargs=None, compile_kwargs=None) -> Visualization:
    check_output_path(out)
    if Path(out).suffix.lower() != ".png":
        raise TpcError(f"tpc visualize writes a PNG: give -o with a .png name, not {str(out)!r}")
    refuse_overwriting([("-o", out)], [("the input image", image_path), ("the model you visualize", model_id),
                                       ("the --weights file", (load_kwargs or {}).get("weights"))])
    loaded = models.load(str(model_id), **(load_kwargs or {}))
    refuse_vlm(loaded.module, "visualize")
    models.refuse_pruned(loaded.module, loaded.name)
    size = loaded.input_size
    if len(size) != 3:
        raise TpcError(f"{loaded.name} does not take images (its input is {list(size)}); visualize needs an image model")
    mean = parse_floats(mean, "mean") or loaded.mean or (0.5,) * size[0]
    std = parse_floats(std, "std") or loaded.std or (0.5,) * size[0]
    image = load_image(image_path, tuple(size[1:]))
    pm = tpc.compile(loaded.module, loaded.example_inputs, method=method, layers=layers, keep=keep, **(compile_kwargs or {}))
    x = torch.tensor(image, dtype=torch.float32).div(255.0).unsqueeze(0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    found_layers, positions = kept_positions(pm.graph_module, (x,))
    report = pm.report
    tokens = report.sites[0].tokens
    patches = tokens - report.prefix
    gh = int(round((patches * size[1] / size[2]) ** 0.5))
    gw = patches // max(1, gh)
    if gh * gw != patches or size[1] % gh or size[2] % gw:
        raise TpcError(f"cannot lay {patches} patch tokens on a grid over a {size[2]}x{size[1]} image")
    return render(image, positions, found_layers, report.prefix, (gh, gw), tokens, out)
