"""Plots: accuracy against FLOPs, one line per method (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

from tpc.errors import TpcError
from tpc.exports.atomic import atomic_output


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TpcError("plots need matplotlib: pip install 'tpc[plot]'") from None
    return plt


def accuracy_vs_flops(rows: list[dict], path: str | Path, title: str, baseline: dict | None = None,
                      metric: str = "top1") -> None:
    """``rows``: dicts with method, gflops, and the metric (a fraction); one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["gflops"], 100 * r[metric]) for r in rows if r["method"] == method and r.get(metric) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    if baseline is not None and baseline.get(metric) is not None:
        ax.axhline(100 * baseline[metric], color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.plot([baseline["gflops"]], [100 * baseline[metric]], marker="*", color="grey", markersize=10)
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel("top-1 (%)" if metric == "top1" else "agreement with unpruned (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
