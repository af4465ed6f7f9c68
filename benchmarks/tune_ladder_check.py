"""Every rung of a `tpc tune` ladder scored on held-out images: which rungs truly hold the budget.

`tpc tune` scores only its pick (and the best single-method recipe) on the check part. To see
the landscape its fixed-sequence test walked, this scores every rung of ``recipe.json``'s
``ladder`` on the images from ``--offset`` on (default: the recipe's check part), next to the
numbers the search recorded: the drop and bound on the tuning part, the test's verdict, and the
drop on the tuning examples the screening saw and on those it did not. Run from the repository
root, after the tune:

    python benchmarks/tune_ladder_check.py cifar_recipe.json --data ../shared/data/cifar10_test.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tpc  # noqa: E402
from tpc import models  # noqa: E402
from tpc.dataset import accuracy, load_dataset, predict  # noqa: E402
from tpc.recipe import Recipe, Step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe.json written by tpc tune (with a ladder)")
    parser.add_argument("--data", required=True, help="the labelled .npz the tune used")
    parser.add_argument("--offset", type=int, help="first image scored (default: the recipe's check part)")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)

    saved = json.loads(Path(args.recipe).read_text())
    offset = args.offset if args.offset is not None else saved["data"]["check"][0]
    loaded = models.load(saved["model"])
    data = load_dataset(args.data, loaded.input_size)
    data.images, data.labels = data.images[offset:], data.labels[offset:]
    ref = predict(loaded.module, data, loaded.mean, loaded.std, args.batch, "unpruned", False)
    base = accuracy(ref, ref, data.labels).top1
    print(f"{saved['model']}: unpruned top-1 {100 * base:.2f}% on images {offset}-{offset + len(data.images) - 1}")
    print(f"{'rung':<72} {'saved':>6} {'drop':>6} {'bound':>6} {'test':<11} {'seen':>6} {'unseen':>6} "
          f"{'u.bound':>7} {'check':>6}")
    verdicts = {True: "certified", False: "FAILS: stop", None: "not tested"}
    for rung in saved["ladder"]:
        recipe = Recipe([Step(**s) for s in rung["steps"]], saved.get("after", "attention"), saved.get("seed", 0))
        pm = tpc.compile(loaded.module, loaded.example_inputs, recipe=recipe)
        preds = predict(pm, data, loaded.mean, loaded.std, args.batch, rung["recipe"], False)
        check = 100 * (base - accuracy(preds, ref, data.labels).top1)
        seen, unseen = rung.get("screened", {}), rung.get("unseen", {})
        mark = "*" if rung["steps"] == saved["steps"] else " "
        print(f"{mark}{rung['recipe'][:71]:<71} {100 * (1 - rung['flops_ratio']):5.1f}% {rung['drop']:6.2f} "
              f"{rung['bound']:6.2f} {verdicts[rung['certified']]:<11} {seen.get('drop', float('nan')):6.2f} "
              f"{unseen.get('drop', float('nan')):6.2f} {unseen.get('bound', float('nan')):7.2f} {check:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
