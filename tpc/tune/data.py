"""The user's data for ``tpc tune``: model inputs, optional labels, and the tuning/check split.

- images: an ``.npz`` with ``images`` (uint8, NHWC or NCHW) and optional ``labels``, or an
  ImageFolder directory (as ``tpc eval`` reads them), normalised with the model's mean/std;
- anything else (token ids and masks of a text encoder): an ``.npz`` with one array per model
  input, named after the forward arguments (``input_ids``, ``attention_mask``: matched by name,
  never by their order in the file), plus optional ``labels``; masks hold 0 and 1, each
  example at least one 1.

The split is deterministic and contiguous: the first ``1 - check_split`` of the examples tune,
the rest check (shuffle a file that is sorted by class beforehand).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from tpc.errors import TpcError
from tpc.dataset import check_data_path, load_dataset, normalise, open_npz, parse_floats, read_array, read_labels


@dataclass
class TuneData:
    inputs: tuple[torch.Tensor, ...]  # each [N, ...], in the model's input order
    labels: torch.Tensor | None
    source: str

    def __len__(self) -> int:
        return len(self.inputs[0])

    def part(self, start: int, end: int) -> TuneData:
        labels = None if self.labels is None else self.labels[start:end]
        return TuneData(tuple(x[start:end] for x in self.inputs), labels, self.source)

    def batch(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        return tuple(x[start:end] for x in self.inputs)


def _numbers(array: np.ndarray, dtype: torch.dtype, name: str, path: str) -> np.ndarray:
    """``array`` when it holds what the model's input of ``dtype`` takes: real numbers, and whole
    ones for an integer input (token ids), never silently cut (1.5 to 1) or a NaN made an id."""
    if array.dtype.kind not in "biuf":
        raise TpcError(f"{path}: {name!r} holds {array.dtype} values; the model's input takes {str(dtype).split('.')[-1]} "
                       "numbers")
    if not dtype.is_floating_point and array.dtype.kind == "f" and not (
            np.isfinite(array).all() and (array == np.round(array)).all()):
        raise TpcError(f"{path}: {name!r} holds values that are not whole numbers (NaN, inf or fractions) but the "
                       f"model's input takes {str(dtype).split('.')[-1]} (token ids): save the integers the tokenizer gave")
    return array


def _check_mask(mask: torch.Tensor, name: str, path: str) -> None:
    """An attention mask: 1 for a token, 0 for padding, and at least one token per example."""
    if not ((mask == 0) | (mask == 1)).all():
        raise TpcError(f"{path}: {name!r} holds values other than 0 and 1 (e.g. {mask[(mask != 0) & (mask != 1)][0].item()}): "
                       "an attention mask is 1 for each token and 0 for padding")
    empty = (mask.reshape(len(mask), -1) == 0).all(dim=1).nonzero()
    if len(empty):
        raise TpcError(f"{path}: {name!r} is all zeros for {len(empty)} example(s) (e.g. example {int(empty[0])}): "
                       "every example needs at least one token; drop empty examples")


def _arrays_in_input_order(npz, module, examples: tuple, path: str) -> tuple[torch.Tensor, ...]:
    names = [k for k in npz.files if k != "labels"]
    if len(names) != len(examples):
        raise TpcError(f"{path} has {len(names)} input arrays ({', '.join(names)}) but the model takes {len(examples)} "
                       "inputs: give one array per input, named after the forward arguments")
    params = [p for p in inspect.signature(module.forward).parameters if p not in ("self", "args", "kwargs")]
    if len(names) > 1:
        if set(names) != set(params[:len(names)]):
            raise TpcError(f"{path} names its input arrays {', '.join(names)} but the model's forward takes "
                           f"{', '.join(params[:len(examples)])}: name each array after the argument it feeds "
                           "(they are matched by name, not by their order in the file)")
        names = sorted(names, key=params.index)
    out = []
    for name, example in zip(names, examples):
        array = torch.from_numpy(_numbers(read_array(npz, name, path), example.dtype, name, path)).to(example.dtype)
        if tuple(array.shape[1:]) != tuple(example.shape[1:]):
            raise TpcError(f"{path}: {name!r} has shape {list(array.shape[1:])} per example but the model's input "
                           f"takes {list(example.shape[1:])}: give examples of that shape (pad or cut token ids to its length, "
                           "resize images)")
        if "mask" in name:
            _check_mask(array, name, path)
        out.append(array)
    if len({len(a) for a in out}) != 1:
        raise TpcError(f"{path}: the input arrays have different lengths")
    return tuple(out)


def load_tune_data(path, loaded, mean=None, std=None) -> TuneData:
    """Inputs and labels for ``loaded`` (a :class:`tpc.models.LoadedModel`)."""
    path = check_data_path(path)
    npz = None if path.is_dir() else open_npz(path)
    if npz is None or "images" in npz.files:
        mean = parse_floats(mean, "mean") or loaded.mean
        std = parse_floats(std, "std") or loaded.std
        if mean is None or std is None:
            raise TpcError(f"{loaded.name} has no normalisation in its config: pass --mean and --std")
        data = load_dataset(path, loaded.input_size)
        labels = None if data.labels is None else torch.from_numpy(data.labels)
        return TuneData((normalise(data.images, mean, std),), labels, str(path))
    inputs = _arrays_in_input_order(npz, loaded.module, loaded.example_inputs, str(path))
    labels = read_labels(npz, path, len(inputs[0]))
    return TuneData(inputs, None if labels is None else torch.from_numpy(labels), str(path))


def split(data: TuneData, check_split: float) -> tuple[TuneData, TuneData | None, int]:
    """(tuning part, check part or None, index where the check part starts)."""
    if not 0.0 <= check_split < 1.0:
        raise TpcError(f"--check-split {check_split} is outside [0, 1): it is the fraction of the data held out")
    n = len(data)
    cut = n - int(round(check_split * n))
    if cut < 2:
        raise TpcError(f"{data.source} has {n} example{'' if n == 1 else 's'}: too few to tune on after holding out {check_split:.0%}")
    check = data.part(cut, n) if cut < n else None
    return data.part(0, cut), check, cut

