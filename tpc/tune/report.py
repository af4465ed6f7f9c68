"""The PNG of a tune: every recipe scored (at the number of tuning examples it reached), one
colour per method or mix, the Pareto front, the unpruned model, the budget and the chosen recipe."""

from __future__ import annotations

from pathlib import Path

from tpc.exports.atomic import atomic_output
from tpc.plot import _pyplot


def plot_front(result, path: str | Path) -> None:
    plt = _pyplot()
    m = result.metric
    base = result.base_value
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    scored = [c for c in result.candidates if c.n and c.refused is None]  # each at the examples it reached
    for family in dict.fromkeys(c.family for c in scored):
        pts = [(100 * c.flops_ratio, base - c.drop) for c in scored if c.family == family]
        ax.scatter(*zip(*pts), s=14, alpha=0.6, label=family)
    if result.front:
        pts = sorted((100 * c.flops_ratio, base - c.drop) for c in result.front)
        ax.plot(*zip(*pts), color="black", linewidth=1, label="Pareto front")
    ax.plot([100], [base], marker="*", color="grey", markersize=12, linestyle="none", label="unpruned")
    if result.budget.get("max_drop") is not None:
        ax.axhline(base - result.budget["max_drop"], color="grey", linestyle="--", linewidth=1, label="budget")
    if result.best is not None:
        ax.plot([100 * result.best.flops_ratio], [base - result.best.drop], marker="o", markersize=11,
                markerfacecolor="none", markeredgecolor="red", linestyle="none", label="chosen")
    ax.set_xlabel("FLOPs, % of the unpruned model")
    ax.set_ylabel({"top1": "top-1 (%)", "agreement": "agreement with unpruned (%)", "cosine": "cosine to unpruned"}[m.name])
    ax.set_title(f"{result.model}: tpc tune, {len(scored)} recipes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
