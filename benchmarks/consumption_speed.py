"""Clearing speed of the serving default `clear-cost` against a numpy sort of the same thresholds.

One process, N = 1e3 .. 1e6 thresholds drawn log-normally like reasoning
lengths, a scarce budget (the price is interior). Columns, best of R repeats:

* sort: ``np.sort`` of the thresholds (the yardstick the issue names);
* exact: the paper's market, exact solver (``clear-paper``);
* clear: the log-normal cap market (``clear``, one spread);
* cost 1σ: ``clear-cost`` with one spread;
* cost cal.: ``clear-cost`` with per-query spreads and runaway shares from an
  8-bin calibration of the predicted length (what serving prices);
* cost tenants: the same with three tenant weights.

Ratios are each time over the sort's, measured side by side in this run. The
coverage tables ``clear-cost`` caches per (spread, runaway) are built before the
timed runs; the first (cold) call of each size is printed as well. Usage:

    python benchmarks/consumption_speed.py [--sizes 1000,10000,100000,1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from clear_core.calibration import Calibration
from clear_core.consumption import clear_consumption_market
from clear_core.market import clear_market
from clear_core.traces import POOL_GENERATION_CAP_TOKENS
from clear_core.uncertainty import clear_market_lognormal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clearing_speed import best_time  # noqa: E402  (the same timing rule as the paper-market benchmark)

#: An 8-bin calibration shaped like the main pool's (spread and runaway share grow with the length).
CALIBRATION = Calibration(
    centres=(4.8, 5.4, 5.7, 6.1, 6.6, 7.3, 8.4, 9.3),
    log_bias=(0.5, 0.13, -0.01, -0.14, -0.18, -0.15, -0.05, -0.47),
    log_sigma=(0.34, 0.30, 0.41, 0.42, 0.45, 0.53, 0.45, 0.39),
    n=(300,) * 8,
    runaway=(0.0, 0.0, 0.0, 0.0, 0.0, 0.04, 0.31, 0.67),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated N (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="best of this many runs (default: %(default)s)")
    ap.add_argument("--budget-per-query", type=float, default=512.0, help="tokens per query (default: %(default)s)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t_max = POOL_GENERATION_CAP_TOKENS
    head = (f"{'N':>9} | {'sort ms':>8} | {'exact ms':>8} | {'clear ms':>8} | {'cost 1σ ms':>10} | {'cost cal. ms':>12} | "
            f"{'cost tenants ms':>15} | {'exact x':>7} | {'clear x':>7} | {'1σ x':>5} | {'cal. x':>6} | {'ten. x':>6} | "
            f"{'cold cal. ms':>12} | types")
    print(head)
    print("-" * len(head))
    for n in (int(float(x)) for x in args.sizes.split(",")):
        tau = rng.lognormal(6.5, 1.0, n)
        med, sig, run = CALIBRATION.apply(tau)
        weights = rng.choice([1.0, 2.0, 4.0], n)
        budget = args.budget_per_query * n
        reps = args.repeats if n < 1_000_000 else max(2, args.repeats // 2)
        t0 = time.perf_counter()
        res = clear_consumption_market(med, budget, log_sigma=sig, runaway=run, context_limit_tokens=t_max)
        cold = time.perf_counter() - t0
        clear_consumption_market(med, budget, log_sigma=sig, runaway=run, weights=weights, context_limit_tokens=t_max)
        clear_consumption_market(tau, budget, log_sigma=0.5, context_limit_tokens=t_max)
        t_sort = best_time(lambda: np.sort(tau), reps)
        t_exact = best_time(lambda: clear_market(tau, budget, context_limit_tokens=t_max), reps)
        t_clear = best_time(lambda: clear_market_lognormal(tau, budget, log_sigma=0.5, context_limit_tokens=t_max), reps)
        t_one = best_time(lambda: clear_consumption_market(tau, budget, log_sigma=0.5, context_limit_tokens=t_max), reps)
        t_cal = best_time(lambda: clear_consumption_market(med, budget, log_sigma=sig, runaway=run,
                                                           context_limit_tokens=t_max), reps)
        t_ten = best_time(lambda: clear_consumption_market(med, budget, log_sigma=sig, runaway=run, weights=weights,
                                                           context_limit_tokens=t_max), reps)
        print(f"{n:>9} | {1e3 * t_sort:>8.2f} | {1e3 * t_exact:>8.2f} | {1e3 * t_clear:>8.2f} | {1e3 * t_one:>10.2f} | "
              f"{1e3 * t_cal:>12.2f} | {1e3 * t_ten:>15.2f} | {t_exact / t_sort:>6.1f}x | {t_clear / t_sort:>6.1f}x | "
              f"{t_one / t_sort:>4.1f}x | {t_cal / t_sort:>5.1f}x | {t_ten / t_sort:>5.1f}x | {1e3 * cold:>12.1f} | "
              f"{res.n_types}")


if __name__ == "__main__":
    main()
