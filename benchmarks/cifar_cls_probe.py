"""Does [CLS] attention rank this model's tokens by usefulness? Keep the most attended tokens
(EViT) versus the least attended ones, same budget, on the first 2,000 CIFAR-10 test images.

    python benchmarks/cifar_cls_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar_vit import DATA, MEAN, STD, model  # noqa: E402

import tpc  # noqa: E402
from tpc.dataset import Dataset, accuracy, load_dataset, predict  # noqa: E402


class Inverted(fx.Interpreter):
    """Runs the pruned graph with every [CLS]-attention score negated: the least attended win."""

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        return -out if target is torch.ops.tpc.cls_attention.default else out


def main() -> None:
    net, inputs = model()
    data = load_dataset(DATA, (3, 32, 32))
    data = Dataset(data.images[:2000], data.labels[:2000], "first 2,000")
    ref = predict(net, data, MEAN, STD)
    for keep in (0.7, 0.5):
        pm = tpc.compile(net, inputs, method="topk-cls", layers=[1, 2], keep=keep)
        most = accuracy(predict(pm, data, MEAN, STD), ref, data.labels)
        least = accuracy(predict(lambda x: Inverted(pm.graph_module).run(x), data, MEAN, STD), ref, data.labels)
        print(f"keep {keep} after layers 1,2: most attended kept {100 * most.top1:.2f}%, "
              f"least attended kept {100 * least.top1:.2f}% (unpruned {100 * accuracy(ref, ref, data.labels).top1:.2f}%)")


if __name__ == "__main__":
    main()
