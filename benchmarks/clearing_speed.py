"""Clearing benchmark: `exact` and `optimal` vs the paper's `bisection`, one process.

Prints wall time per clearing (best of R repeats) for N = 1e3 .. 1e6 thresholds
drawn log-normally like reasoning lengths, at a scarce budget (the clearing
price is interior, so every method does its full work), and the speed-up
ratios measured side by side. "active differ" counts queries whose solvency
differs between bisection and exact: the bisection stops once its price bracket
is narrower than 1e-6, and with 1e5+ queries several insolvency prices fall
inside that last bracket. Usage:

    python benchmarks/clearing_speed.py [--sizes 1e3,1e4,1e5,1e6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clear_core.cli_args import HelpFormatter, add_list_argument, positive_float, positive_int
from clear_core.market import clear_market
from clear_core.traces import POOL_GENERATION_CAP_TOKENS


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _size(text: str) -> int:
    """A count written 100000 or 1e5."""
    value = float(text)
    if not 1 <= value < 1e12 or value != int(value):
        raise ValueError(text)
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/clearing_speed.py", description=__doc__,
                                 formatter_class=HelpFormatter)
    add_list_argument(ap, "--sizes", kind=_size, what="positive counts (1e5 or 100000)", metavar="N",
                      default="1000,10000,100000,1000000", help="numbers of thresholds")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timings per cell; the best is kept")
    ap.add_argument("--budget-per-query", type=positive_float, default=512.0, help="tokens per query (scarce)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'N':>9} | {'bisection s':>11} | {'exact s':>9} | {'optimal s':>9} | {'exact x':>8} | {'optimal x':>9} | "
          f"{'price (bis)':>11} | {'price (exact)':>13} | active differ")
    print("-" * 118)
    for n in args.sizes:
        tau = rng.lognormal(6.5, 1.0, n)
        budget = args.budget_per_query * n
        kw = dict(context_limit_tokens=POOL_GENERATION_CAP_TOKENS)
        results = {}

        def run(method):
            results[method] = clear_market(tau, budget, method=method, fill_unused=False, **kw)

        reps = max(1, args.repeats if n < 1_000_000 else 2)
        t_bis = best_time(lambda: run("bisection"), 1 if n >= 100_000 else reps)
        t_exa = best_time(lambda: run("exact"), reps)
        t_opt = best_time(lambda: run("optimal"), reps)
        b, e = results["bisection"], results["exact"]
        # The bisection stops once its bracket is < 1e-6 wide, so queries whose
        # insolvency price lies inside that last bracket may differ.
        same = int((b.active != e.active).sum())
        print(f"{n:>9} | {t_bis:>11.4f} | {t_exa:>9.4f} | {t_opt:>9.4f} | {t_bis / t_exa:>7.1f}x | {t_bis / t_opt:>8.1f}x | "
              f"{b.shadow_price:>11.7f} | {e.shadow_price:>13.7f} | {same}")


if __name__ == "__main__":
    main()
