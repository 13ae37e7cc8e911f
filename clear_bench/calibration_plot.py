"""How well the priced length distribution predicts whether a cap is enough (``calibration.png``).

Two views, each for two models of the same queries: the calibrated per-query
distribution ``clear-cost`` prices (median, spread and runaway share, out of
fold) and the raw prediction with one global spread (what ``clear`` prices).

* left, quantile coverage: for every query of the bench's streams, the cap its
  model says finishes it with probability q (a runaway share caps that at
  ``1 - rho``), the predicted share against the share of queries that really
  finished within it (:func:`clear_core.calibration.quantile_coverage`);
  a calibrated model is on the diagonal for every q;
* right, the caps ``clear-cost`` really gave: predicted probability of
  finishing against the observed share, binned (a reliability diagram; the
  marker area is the number of caps), and its expected calibration error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clear_core.calibration import coverage_error, coverage_table, quantile_coverage, quantile_coverage_error  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, make_stream  # noqa: E402

POLICY = "clear-cost"
MODELS = ("calibrated", "global")
STYLE = {"calibrated": dict(marker="o", color="tab:blue"), "global": dict(marker="s", color="tab:orange")}


def coverage_study(problems, predictions, out: Path, *, streams: Sequence[str], budgets: Sequence[int],
                   seeds: Sequence[int], n_queries: int, context_limit_tokens) -> dict:
    """Draw ``calibration.png``; return both models' quantile coverage, reliability bins and errors."""
    policy = parse_policy(POLICY)
    queries = {m: [] for m in MODELS}  # per stream draw: (tokens, tau, sigma, runaway)
    capped = {m: [] for m in MODELS}  # per allocation: (caps, tokens, tau, sigma, runaway)
    for stream_name in streams:
        for seed in seeds:
            stream = make_stream(problems, stream_name, n_queries, seed)
            n = len(stream)
            med, sig, run = predictions.distribution(stream)
            model = {"calibrated": (med, np.broadcast_to(sig, (n,)), np.broadcast_to(run, (n,))),
                     "global": (predictions.thresholds(stream), np.full(n, max(predictions.sigma, 1e-3)), np.zeros(n))}
            for m in MODELS:
                queries[m].append((stream.tokens, *model[m]))
            for b in budgets:
                caps = policy.allocate(med, b * n, context_limit_tokens=context_limit_tokens,
                                       log_sigma=sig, runaway=run).caps
                for m in MODELS:
                    capped[m].append((caps, stream.tokens, *model[m]))
    result = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    for ax in (left, right):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for m in MODELS:
        label = "calibrated per query (out of fold)" if m == "calibrated" else \
            f"raw prediction, one spread {predictions.sigma:.2f}"
        cols = [np.concatenate(c) for c in zip(*queries[m])]
        pairs = quantile_coverage(*cols, censor_tokens=POOL_GENERATION_CAP_TOKENS)
        q_err = quantile_coverage_error(pairs)
        left.plot([q for q, _ in pairs], [o for _, o in pairs], label=f"{label}: mean error {q_err:.3f}", **STYLE[m])
        cols = [np.concatenate(c) for c in zip(*capped[m])]
        rows = coverage_table(*cols, censor_tokens=POOL_GENERATION_CAP_TOKENS)
        ece = coverage_error(rows)
        total = sum(r.n for r in rows)
        right.plot([r.predicted for r in rows], [r.observed for r in rows], color=STYLE[m]["color"], alpha=0.6)
        right.scatter([r.predicted for r in rows], [r.observed for r in rows], s=[20 + 400 * r.n / total for r in rows],
                      marker=STYLE[m]["marker"], color=STYLE[m]["color"], label=f"{label}: ECE {ece:.3f}", zorder=3)
        result[m] = {"quantile_coverage": pairs, "quantile_error": q_err, "cap_ece": ece,
                     "cap_bins": [r.__dict__ for r in rows]}
    left.set_xlabel("predicted share finished within the q-quantile caps (q = 0.1 .. 0.9)")
    left.set_ylabel("observed share finished within the cap")
    left.set_title("Every query at its q-quantile cap", fontsize=10)
    right.set_xlabel(f"predicted probability of finishing within {POLICY}'s cap")
    right.set_ylabel("observed share finished within the cap")
    right.set_title(f"The caps {POLICY} gave (marker area: caps per bin)", fontsize=10)
    for ax in (left, right):
        ax.legend(loc="lower right", fontsize=8, markerscale=0.6)
    fig.suptitle(f"Calibration of the length distribution: {predictions.spec}, streams {', '.join(streams)}",
                 fontsize=10)
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    return result
