"""The paper's figures on our pools (matplotlib, PNG): Figs. 5-8 and 11."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clear_bench.report import aggregate  # noqa: E402


def phase_transition(rows: Sequence[dict], out: Path, policies=("uniform", "clear-paper", "clear")) -> Path:
    """Accuracy and abandonment rate vs budget per stream (Fig. 5)."""
    acc = aggregate(rows, "accuracy")
    ab = aggregate(rows, "abandonment_rate")
    streams = sorted({k[0] for k in acc})
    budgets = sorted({k[1] for k in acc})
    fig, axes = plt.subplots(2, len(streams), figsize=(4 * len(streams), 6.5), squeeze=False, sharex=True)
    for j, stream in enumerate(streams):
        for p in policies:
            if (stream, budgets[0], p) not in acc:
                continue
            axes[0, j].errorbar(
                budgets,
                [100 * acc[(stream, b, p)][0] for b in budgets],
                yerr=[100 * acc[(stream, b, p)][1] for b in budgets],
                marker="o",
                capsize=3,
                label=p,
            )
            axes[1, j].plot(budgets, [100 * ab[(stream, b, p)][0] for b in budgets], marker="s", label=p)
        axes[0, j].set_title(stream)
        axes[1, j].set_xlabel("budget per query (tokens)")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[1, 0].set_ylabel("abandonment rate (%)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Phase transition: accuracy and abandonment vs budget")
    fig.tight_layout()
    path = out / "phase_transition.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def allocation_scatter(thresholds, caps, tokens, correct, out: Path, title: str) -> Path:
    """Predicted threshold vs cap; abandoned queries marked (Fig. 6)."""
    thresholds, caps = np.asarray(thresholds), np.asarray(caps)
    solved = (caps >= np.asarray(tokens)) & np.asarray(correct, bool) & (caps > 0)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    admitted = caps > 0
    ax.scatter(thresholds[admitted & ~solved], caps[admitted & ~solved], s=10, c="tab:orange", label="admitted, not solved")
    ax.scatter(thresholds[admitted & solved], caps[admitted & solved], s=10, c="tab:green", label="admitted, solved")
    ax.scatter(thresholds[~admitted], np.full((~admitted).sum(), 1.0), s=12, marker="x", c="tab:red", label="abandoned (cap 0)")
    lim = [max(1.0, thresholds.min()), max(thresholds.max(), caps.max(), 2.0)]
    ax.plot(lim, lim, "k--", lw=0.8, label="cap = threshold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted threshold (tokens)")
    ax.set_ylabel("cap (tokens; abandoned drawn at 1)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "allocation_scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines_plot(
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    out: Path,
    name: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """A generic line plot used by the noise, beta and alpha figures."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
