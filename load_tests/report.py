"""Summaries, the side-by-side table and the over-time plots of a load test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from load_tests.driver import RequestRecord


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict:
    n = len(records)
    ok = [r for r in records if r.status == "ok"]
    solved = sum(r.solved for r in records)
    generated = sum(r.completion_tokens for r in ok)
    allocated = sum(r.allocated_tokens or 0 for r in ok)
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": n,
        "ok": len(ok),
        "abandoned_429": sum(r.status == "abandoned" for r in records),
        "rejected_4xx": sum(r.status == "rejected" for r in records),
        "errors": sum(r.status in ("error", "timeout") for r in records),
        "rate_429": sum(r.status == "abandoned" for r in records) / n if n else 0.0,
        "solved": solved,
        "accuracy": solved / n if n else 0.0,
        "wall_s": wall_s,
        "goodput_solved_per_s": solved / wall_s if wall_s > 0 else 0.0,
        "tokens_allocated": allocated,
        "tokens_generated": generated,
        "solved_per_1k_generated": 1000.0 * solved / generated if generated else 0.0,
        "solved_per_1k_allocated": 1000.0 * solved / allocated if allocated else 0.0,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "latency_p50_s": _pct(lat, 50),
        "latency_p90_s": _pct(lat, 90),
        "latency_p99_s": _pct(lat, 99),
        "mean_shadow_price": float(np.mean([r.shadow_price for r in records if r.shadow_price is not None]))
        if any(r.shadow_price is not None for r in records) else None,
    }


ROWS = [
    ("requests", "requests", "{:d}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("solved", "solved", "{:d}"),
    ("rate_429", "429 rate", "{:.1%}"),
    ("errors", "errors", "{:d}"),
    ("goodput_solved_per_s", "solved / s", "{:.2f}"),
    ("solved_per_1k_generated", "solved / 1k generated tok", "{:.2f}"),
    ("solved_per_1k_allocated", "solved / 1k allocated tok", "{:.2f}"),
    ("tokens_allocated", "tokens allocated", "{:,d}"),
    ("tokens_generated", "tokens generated", "{:,d}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p99_s", "latency p99 (s)", "{:.3f}"),
    ("mean_shadow_price", "mean shadow price", "{:.4g}"),
    ("wall_s", "wall time (s)", "{:.1f}"),
]


def side_by_side(summaries: dict[str, dict]) -> str:
    """Markdown table: one column per target (deployment or policy)."""
    labels = list(summaries)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name, fmt in ROWS:
        cells = []
        for lab in labels:
            v = summaries[lab].get(key)
            cells.append("" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_over_time(runs: dict[str, Sequence[RequestRecord]], path: Path) -> Path:
    """Cumulative accuracy and per-request latency against time since the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for label, recs in runs.items():
        done = sorted(recs, key=lambda r: r.start_s + r.latency_s)
        t = np.array([r.start_s + r.latency_s for r in done])
        acc = np.cumsum([r.solved for r in done]) / np.arange(1, len(done) + 1)
        a1.plot(t, 100 * acc, label=label)
        ok = [r for r in done if r.status == "ok"]
        a2.scatter([r.start_s + r.latency_s for r in ok], [r.latency_s for r in ok], s=6, label=label, alpha=0.6)
    a1.set_ylabel("cumulative accuracy (%)")
    a2.set_ylabel("end-to-end latency (s)")
    a2.set_xlabel("time since start (s)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Load test: accuracy and latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
