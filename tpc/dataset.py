"""Labelled images for ``tpc eval`` and ``tpc tune``: loading, normalised batches, predictions,
and accuracy of a pruned model next to the unpruned one.

Data: an ``.npz`` with ``images`` (uint8 0-255, or float already in [0, 1]; NHWC or NCHW) and
optional integer ``labels`` (the format of the CIFAR-10 test file), or an ImageFolder directory
(one sub-directory per class). uint8 images are scaled to [0, 1]; all are normalised with the
model's mean/std. Reported per model:
top-1 (when labels exist) and agreement, the share of images where the pruned model
predicts what the unpruned one predicts.
"""

from __future__ import annotations

import logging
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tpc.errors import TpcError, check_readable
from tpc.models import parse_numbers

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Dataset:
    images: np.ndarray  # NCHW, uint8 (0-255) or float32 in [0, 1]
    labels: np.ndarray | None
    source: str


def _to_nchw(images: np.ndarray, path) -> np.ndarray:
    if images.ndim != 4:
        raise TpcError(f"{path}: 'images' must be 4-D (N, H, W, C) or (N, C, H, W), got shape {images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def read_array(data, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(data[key])
    except ValueError:  # numpy refuses object arrays without allow_pickle, which tpc never sets
        raise TpcError(f"{str(path)!r}: {key!r} is an array of Python objects; save numbers "
                       "(images uint8 or float in [0, 1], labels integers)") from None


def _pixels(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 images as they are; float images must already be scaled to [0, 1]."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind == "f" and images.size and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1:
        return images.astype(np.float32)
    if images.dtype.kind == "f" and not images.size:
        return images.astype(np.float32)
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = np.isnan(images).sum()
        what = f"{bad:,} NaN values" if bad else f"{(~np.isfinite(images)).sum():,} infinite values"
        raise TpcError(f"{str(path)!r}: images hold {what}: give uint8 (0-255) or float images in [0, 1]")
    found = f"{images.dtype}" + (f" in [{images.min():g}, {images.max():g}]" if images.size and images.dtype.kind in "fiub" else "")
    raise TpcError(f"{str(path)!r}: images must be uint8 (0-255) or float in [0, 1], not {found}")


def open_npz(path: Path):
    """The arrays of an ``.npz`` (numpy.savez), never unpickling; a clear refusal for anything else."""
    if not zipfile.is_zipfile(path):
        raise TpcError(f"{str(path)!r} is not an .npz file (a zip of arrays written by numpy.savez)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise TpcError(f"cannot read {str(path)!r} as .npz: {err}".splitlines()[0]) from err


def read_labels(data, path: Path, count: int) -> np.ndarray | None:
    """The optional ``labels`` array of an opened ``.npz``: ``count`` integer class indices."""
    if "labels" not in data.files:
        return None
    labels = read_array(data, "labels", path)
    if labels.ndim != 1:
        raise TpcError(f"{str(path)!r}: labels must be one class index per example, shape ({count},), not "
                       f"{tuple(labels.shape)}; save labels.reshape(-1)")
    if labels.dtype.kind not in "iu":
        raise TpcError(f"{str(path)!r}: labels must be integer class indices, not {labels.dtype}")
    if len(labels) != count:
        raise TpcError(f"{str(path)!r}: {count} examples but {len(labels)} labels")
    return labels.astype(np.int64)


def load_npz(path: Path) -> Dataset:
    data = open_npz(path)
    if "images" not in data.files:
        raise TpcError(f"{str(path)!r} has no 'images' array (it has: {', '.join(data.files) or 'nothing'})")
    images = _to_nchw(_pixels(read_array(data, "images", path), path), path)
    return Dataset(images, read_labels(data, path, len(images)), str(path))


def load_image_folder(path: Path, size: tuple[int, int]) -> Dataset:
    """ImageFolder: resize the short side and centre-crop to the model's input size."""
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise TpcError(f"{str(path)!r} has no class sub-directories (expected path/<class>/<image>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(resize_crop(open_image(file), size))
                labels.append(label)
    if not images:
        raise TpcError(f"{str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(np.stack(images), np.array(labels, dtype=np.int64), str(path))


def open_image(file: Path):
    """``file`` as an RGB image; a refusal naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise TpcError(f"{str(file)!r} is not a readable image ({type(err).__name__}): fix or remove it") from None


def resize_crop(img, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))))
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h))).transpose(2, 0, 1)


def check_data_path(path: str | Path) -> Path:
    return check_readable(path, "data", "an .npz with images/labels or an ImageFolder directory", directory=True)


def load_dataset(path: str | Path, input_size: Sequence[int]) -> Dataset:
    path = check_data_path(path)
    data = load_image_folder(path, tuple(input_size[1:])) if path.is_dir() else load_npz(path)
    if tuple(data.images.shape[1:]) != tuple(input_size):
        raise TpcError(
            f"images in {data.source} are {list(data.images.shape[1:])} (C, H, W) but the model takes {list(input_size)}"
        )
    return data


def parse_floats(text, name: str) -> tuple[float, ...] | None:
    """--mean or --std: finite numbers, a std above 0 (images are divided by it)."""
    values = parse_numbers(text, float, name, "0.5,0.5,0.5")
    if values is not None and not all(np.isfinite(v) and (v > 0 or name != "std") for v in values):
        raise TpcError(f"--{name} {text}: " + ("every value is a finite number above 0 (images are divided by it)"
                                               if name == "std" else "every value is a finite number"))
    return values


def normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """NCHW float32 ``(x - mean) / std``, with uint8 images scaled to [0, 1] first."""
    x = torch.from_numpy(images).float()
    if images.dtype == np.uint8:
        x = x.div_(255.0)
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)


def batches(data: Dataset, mean, std, batch: int):
    for start in range(0, len(data.images), batch):
        yield start, normalise(data.images[start:start + batch], mean, std)


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or when forced)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.start = total, label, time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, done: int) -> None:
        if self.enabled:
            width = 30
            filled = int(width * done / max(1, self.total))
            rate = done / max(1e-9, time.perf_counter() - self.start)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} ({rate:.0f}/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@torch.no_grad()
def predict(model: Callable, data: Dataset, mean, std, batch: int = 500, label: str = "eval",
            progress: bool | None = None) -> np.ndarray:
    preds = np.empty(len(data.images), dtype=np.int64)
    bar = Progress(len(data.images), label, progress)
    for start, x in batches(data, mean, std, batch):
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        preds[start:start + len(x)] = torch.as_tensor(out).argmax(-1).numpy()
        bar.update(start + len(x))
    bar.close()
    return preds


def warn_if_labels_look_meaningless(labels, classes: int) -> None:
    """One line when top-1 against these labels cannot mean much (a constant, or classes the
    model's ``classes`` outputs lack)."""
    if labels is None or not len(labels):
        return
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        logger.warning(f"the labels run from {int(labels.min())} to {int(labels.max())} but the model has {classes} "
                       "outputs: top-1 against them is meaningless; check the labels or use --metric agreement")
    elif len(labels) > 1 and bool((labels == labels[0]).all()):
        logger.warning(f"every label is {int(labels[0])}: top-1 on this data measures one class only; "
                       "check the labels or use --metric agreement")


@dataclass
class Accuracy:
    top1: float | None
    agreement: float


def accuracy(preds: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Accuracy:
    top1 = float((preds == labels).mean()) if labels is not None else None
    return Accuracy(top1, float((preds == reference).mean()))
