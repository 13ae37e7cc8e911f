"""``online_pacing.png``: one stream served online, with and without requests in flight.

Three panels over the arrivals of one stream (one policy, one budget):
what the ledger has spent and holds in reservations against the block of
``b N`` and its even pace; the per-query budget each request was priced with
(the block's remainder per arrival still to come); and the caps, with the
requests abandoned. Drawn for 0 requests in flight and for the concurrency
given, so the cost of holding whole caps while they run is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clear_bench.online import serve_online
from clear_bench.plots import _footnote, _save, _suptitle, plt

#: Requests in flight drawn beside none.
DEFAULT_IN_FLIGHT = 32


def _rolling(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over ``k`` arrivals (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    i = np.arange(1, x.size + 1)
    lo = np.maximum(i - k, 0)
    return (c[i] - c[lo]) / (i - lo)


def online_pacing_figure(traces: dict, budget_per_query: int, n: int, title: str):
    """``traces``: label -> the list :func:`clear_bench.online.serve_online` filled."""
    fig, axes = plt.subplots(3, 1, figsize=(9.0, 9.5), sharex=True, layout="constrained")
    x = np.arange(1, n + 1)
    top, mid, bottom = axes
    top.axhline(budget_per_query * n / 1e3, color="black", linewidth=1, label="block b N")
    top.plot(x, budget_per_query * x / 1e3, color="0.5", linestyle=":", label="even pace b i")
    for k, (label, tr) in enumerate(traces.items()):
        color = f"C{k}"
        spent = np.array([r["spent"] for r in tr]) / 1e3
        held = spent + np.array([r["reserved"] for r in tr]) / 1e3
        top.plot(x, spent, color=color, label=f"{label}: spent", gid=f"spent:{label}")
        top.fill_between(x, spent, held, color=color, alpha=0.25, label=f"{label}: + reserved caps")
        mid.plot(x, [r["budget_per_query"] for r in tr], color=color, label=label)
        caps = np.array([r["cap"] for r in tr], dtype=float)
        bottom.plot(x, _rolling(caps, 25), color=color, label=f"{label}: cap (mean of 25)")
        gone = np.array([r["cap"] == 0 for r in tr])
        bottom.plot(x[gone], np.zeros(gone.sum()) + k * 150, "|", color=color, markersize=9,
                    label=f"{label}: abandoned ({gone.sum()})")
    top.set_ylabel("tokens (thousands)")
    top.legend(fontsize=8, loc="upper left")
    mid.axhline(budget_per_query, color="0.5", linestyle=":", linewidth=1)
    mid.set_ylabel("per-query budget priced with")
    mid.set_yscale("log")
    mid.legend(fontsize=8)
    bottom.set_ylabel("cap (tokens)")
    bottom.set_xlabel("arrival")
    bottom.legend(fontsize=8, loc="upper left")
    for ax in axes:
        ax.grid(alpha=0.3)
    _suptitle(fig, title)
    _footnote(bottom, ["Each request settles with min(recorded length, cap); in flight: it settles that many arrivals "
                       "later, holding its whole cap until then (clear_bench.online)."], 9.0)
    return fig


def online_pacing(policy, inputs, tokens, budget_per_query: int, out: Path, *, context_limit_tokens,
                  in_flight: int, title: str) -> Path:
    """Serve the stream with 0 and ``in_flight`` (at least :data:`DEFAULT_IN_FLIGHT`) requests in flight; draw both."""
    traces = {}
    for k in sorted({0, max(in_flight, DEFAULT_IN_FLIGHT)}):
        tr: list = []
        serve_online(policy, inputs, tokens, budget_per_query, context_limit_tokens=context_limit_tokens,
                     in_flight=k, trace=tr)
        traces[f"{k} in flight"] = tr
    return _save(online_pacing_figure(traces, budget_per_query, len(tokens), title), out / "online_pacing.png")
