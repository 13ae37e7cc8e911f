"""How strongly to shrink each calibration bin's length histogram: held-out log-likelihood per prior strength.

``clear-cost-emp`` prices each query's length with the empirical histogram of
its calibration bin (:mod:`clear_core.empirical_market`). A bin of a few dozen
hard problems is a noisy histogram; ``fit_calibration(..., shrink=k)`` mixes it
with the histogram of every calibration length placed at the bin's centre
(a Dirichlet prior of ``k`` pseudo-samples, :mod:`clear_core.calibration`).
This prints, for each stream's weighting of the pool and each ``k``, the mean
log-likelihood of held-out lengths (5 folds by problem: each fold scored by the
calibration fitted on the other four; each problem counts once in the prior's
weight). It never looks at accuracy or at a bench result. It is *not* what the
default (``clear_core.calibration.DEFAULT_SHRINK`` = 30) was chosen by: the
likelihood is highest at k = 2 out of fold, while the allocation did best with a
stronger prior, picked on the bench's streams (docs/results/cost-markets.md, "How the histogram
defaults were chosen"). Usage:

    python benchmarks/histogram_prior.py                     # oracle-noise:0.5
    python benchmarks/histogram_prior.py --predictions artifacts/predictions/oof-minilm.jsonl

(the out-of-fold file comes from ``clear-llm predictor crossval``, see docs/results/predictor.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_bench.predictions import parse_predictions  # noqa: E402
from clear_core.calibration import DEFAULT_FOLDS, DEFAULT_SHRINK, fit_calibration, fold_of, histogram_log_likelihood  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, run_command  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, load_pool, pool_streams, query_weights  # noqa: E402

DEFAULT_POOL = REPO_ROOT.parent / "shared" / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
STRENGTHS = (0.0, 5.0, 10.0, 20.0, 30.0, 100.0, 300.0, 1000.0)


def heldout(pairs, weights, k: float, folds: int = DEFAULT_FOLDS) -> float:
    pred, obs, groups, _, ok = pairs
    fold = np.array([fold_of(g, folds) for g in groups])
    total, mass = 0.0, 0.0
    for f in range(folds):
        train, test = fold != f, (fold == f) & (weights > 0)
        cal = fit_calibration(pred[train], obs[train], weights=weights[train], censor_tokens=POOL_GENERATION_CAP_TOKENS,
                              correct=ok[train], shrink=k, clusters=np.asarray(groups)[train])
        ll = histogram_log_likelihood(cal, pred[test], obs[test], censor_tokens=POOL_GENERATION_CAP_TOKENS,
                                      weights=weights[test])
        total += ll * weights[test].sum()
        mass += weights[test].sum()
    return total / mass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/histogram_prior.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--traces", default=str(DEFAULT_POOL), help="oracle pool JSONL")
    p.add_argument("--predictions", default="oracle-noise:0.5",
                   help="oracle-noise:SIGMA or a predictions JSONL (out of fold)")
    add_list_argument(p, "--strengths", kind=float, what="numbers >= 0", metavar="K", default=list(STRENGTHS),
                      help="prior strengths in pseudo-samples")
    return p


def run(args) -> int:
    problems = load_pool(args.traces)
    pairs = parse_predictions(args.predictions, calibration="binned", problems=problems).calibration_set
    print(f"held-out mean log-likelihood of lengths per prior strength k ({args.predictions}; default k = {DEFAULT_SHRINK:g})")
    print("| stream | " + " | ".join(f"k={k:g}" for k in args.strengths) + " | best |")
    print("|---" * (len(args.strengths) + 2) + "|")
    for stream in pool_streams(problems):
        w = query_weights(pairs[3], stream)
        ll = [heldout(pairs, w, k) for k in args.strengths]
        print(f"| {stream} | " + " | ".join(f"{v:.4f}" for v in ll) + f" | {args.strengths[int(np.argmax(ll))]:g} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("python benchmarks/histogram_prior.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
