"""What ``tpc tune`` measures, per example, against the unpruned model.

Each metric turns a model output into per-example scores; its value is their mean, and the
*drop* (what ``--max-drop`` bounds) is the unpruned model's value minus the pruned one's:

- ``top1``: 100 x [argmax = label] (labels needed); drop in points of top-1;
- ``agreement``: 100 x [argmax = the unpruned model's argmax]; drop = 100 - agreement, in points;
- ``cosine``: cosine similarity to the unpruned output (an embedding [B, C]; for token
  outputs [B, N, C], the first token, which pruning keeps in place); drop = 1 - mean cosine,
  so ``--max-drop 0.01`` asks for a mean cosine of at least 0.99.

Default: ``top1`` when the data has labels; ``agreement`` for a classifier (its output is
logits over classes); ``cosine`` otherwise (feature models, sentence encoders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tpc.errors import TpcError

METRICS = ("top1", "agreement", "cosine")


def first_tensor(out) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple/list, a dict or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TpcError(f"the model's output ({type(out).__name__}) holds no tensor to measure")


def _features(out: torch.Tensor) -> torch.Tensor:
    out = out.float()
    if out.dim() == 3:
        out = out[:, 0]
    return out.reshape(len(out), -1)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str

    def per_example(self, out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Scores of each example, float64 [B]."""
        if self.name == "top1":
            return 100.0 * (_features(out).argmax(-1) == labels).double()
        if self.name == "agreement":
            return 100.0 * (_features(out).argmax(-1) == _features(ref).argmax(-1)).double()
        return torch.nn.functional.cosine_similarity(_features(out), _features(ref), dim=-1).double()

    def best(self, base_value: float) -> float:
        """The unpruned model's value (top-1 as measured; agreement and cosine are perfect by definition)."""
        return base_value if self.name == "top1" else (100.0 if self.name == "agreement" else 1.0)

    def drop(self, scores: torch.Tensor, base_scores: torch.Tensor) -> tuple[float, float]:
        """(drop of the mean, its standard error) over the examples scored so far (paired with the unpruned)."""
        n = len(scores)
        diff = base_scores[:n] - scores if self.name == "top1" else self.best(0.0) - scores
        mean = float(diff.mean())
        spread = float(diff.std()) if n > 1 else float("inf")
        # no flip seen is no proof of none: the spread is at least that of one flipped example (one
        # example off by 100 points, or by 0.01 of cosine) among n, which is that size / sqrt(n)
        floor = (100.0 if self.name != "cosine" else 0.01) / math.sqrt(n)
        return mean, max(spread, floor) / math.sqrt(n)

    def format(self, value: float) -> str:
        return f"{value:.4f}" if self.name == "cosine" else f"{value:.2f}%"

    def format_drop(self, value: float) -> str:
        return f"{value:.4f}" if self.name == "cosine" else f"{value:.2f} pt"


def choose_metric(name: str | None, labels, module, reference: torch.Tensor) -> Metric:
    """The metric asked for, or the default for the data and the model's output."""
    if name is None:
        if labels is not None:
            name = "top1"
        elif _is_classifier(module, reference):
            name = "agreement"
        else:
            name = "cosine"
    if name not in METRICS:
        raise TpcError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}")
    if name == "top1" and labels is None:
        raise TpcError("--metric top1 needs labels in the data: add a 'labels' array, or use agreement or cosine")
    if name in ("top1", "agreement") and _features(reference).shape[-1] < 2:
        raise TpcError(f"--metric {name} needs class scores as the model's output; use cosine")
    unit = "cosine" if name == "cosine" else "points"
    return Metric(name, unit)


def _is_classifier(module, reference: torch.Tensor) -> bool:
    if reference.dim() != 2:
        return False
    classes = getattr(module, "num_classes", None)
    if classes is None:
        config = getattr(module, "config", None)
        arch = (getattr(config, "architectures", None) or [""])[0]
        classes = getattr(config, "num_labels", None) if "Classification" in arch or "Classification" in type(module).__name__ else None
    return bool(classes) and reference.shape[-1] == classes
