"""What the reservation price costs a central decision, and what it buys, with requests in flight.

A steady stream arrives at a token bucket, one request a second; each
request holds its cap for ``--in-flight`` arrivals, then settles with
``min(length, cap)`` (lengths log-normal around the thresholds, so the
market's model of them is right). The same stream is decided by
:class:`clear_core.online_market.OnlineMarket` with and without the second
price (the bound on the mean cap switched off), side by side in one process. Printed per policy:
the decision latency (p50 / p99, after a warm-up), the decisions whose
reservation price was above 0, the requests finished within their caps, and
those abandoned with the bucket held by open caps. Usage:

    python benchmarks/reservation_price.py
    python benchmarks/reservation_price.py --requests 3000 --in-flight 64 --burst 240000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_core.budget import TokenBucketBudget  # noqa: E402
from clear_core.empirical_market import lognormal_histogram  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, non_negative_int, positive_float, positive_int, run_command  # noqa: E402
from clear_core.ledger import TokenLedger  # noqa: E402
from clear_core.online_market import DecisionReason, OnlineMarket  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402

CONTEXT_LIMIT = 8192
SIGMAS = (0.4, 0.7, 1.0)
RUNAWAY = 0.05


def serve(policy: str, priced: bool, args) -> dict:
    rng = np.random.default_rng(args.seed)
    clock = [0.0]
    ledger = TokenLedger(TokenBucketBudget(tokens_per_s=args.tokens_per_s, burst_tokens=args.burst), lambda: clock[0])
    pol = parse_policy(policy)
    # clear-cost-emp is told the same log-normals, as histograms (one per spread; a request names its own).
    lengths = tuple(lognormal_histogram(s, RUNAWAY) for s in SIGMAS) if pol.prices_length_histograms else ()
    market = OnlineMarket(pol, ledger, context_limit_tokens=CONTEXT_LIMIT, lengths=lengths)
    if not priced:  # the same market without its second budget: no bound on the mean cap
        market.mean_cap_budget = lambda now: None
    which = rng.integers(0, len(SIGMAS), args.requests)
    sigma = np.asarray(SIGMAS)[which]
    tau = np.exp(rng.uniform(5.0, 7.5, args.requests))
    length = np.where(rng.random(args.requests) < RUNAWAY, np.inf, tau * np.exp(sigma * rng.standard_normal(args.requests)))
    running: deque = deque()
    caps = np.zeros(args.requests, dtype=np.int64)
    times, priced_decisions, dry = [], 0, 0
    for i in range(args.requests):
        clock[0] = float(i)
        t0 = time.perf_counter()
        if pol.prices_length_histograms:
            d = market.request(str(i), float(tau[i]), length_bin=int(which[i]))
        else:
            d = market.request(str(i), float(tau[i]), log_sigma=float(sigma[i]), runaway=RUNAWAY)
        times.append(time.perf_counter() - t0)
        priced_decisions += d.reservation_price > 0
        dry += d.reason is DecisionReason.POOL_EMPTY
        if d.admitted:
            caps[i] = d.cap_tokens
            running.append(i)
        while running and running[0] <= i - args.in_flight:
            j = running.popleft()
            market.settle(str(j), int(min(length[j], caps[j])))
    while running:
        j = running.popleft()
        market.settle(str(j), int(min(length[j], caps[j])))
    ms = np.asarray(times[args.warmup:]) * 1e3
    return {"p50": float(np.median(ms)), "p99": float(np.percentile(ms, 99)), "priced": priced_decisions,
            "finished": int((length <= caps).sum()), "dry": dry}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/reservation_price.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_list_argument(p, "--policies", kind=str, metavar="SPEC", default=["clear-cost", "clear-cost-emp"],
                      help="policies that price reservations")
    p.add_argument("--requests", type=positive_int, default=1500, help="arrivals, one a second")
    p.add_argument("--warmup", type=non_negative_int, default=300, help="decisions left out of the latency")
    p.add_argument("--in-flight", type=positive_int, default=32, help="arrivals a request holds its cap for")
    p.add_argument("--burst", type=positive_float, default=120_000.0, help="token bucket capacity")
    p.add_argument("--tokens-per-s", type=positive_float, default=3_000.0, help="token bucket refill")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream")
    return p


def run(args) -> int:
    print(f"{args.requests} requests, {args.in_flight} in flight, bucket {args.burst:g} at {args.tokens_per_s:g}/s")
    print("| policy | reservation price | decision p50 / p99 | decisions priced | finished within cap | pool empty |")
    print("|---|---|---|---|---|---|")
    for policy in args.policies:
        for priced in (False, True):
            r = serve(policy, priced, args)
            print(f"| {policy} | {'on' if priced else 'off'} | {r['p50']:.2f} / {r['p99']:.2f} ms | {r['priced']} | "
                  f"{r['finished']} of {args.requests} | {r['dry']} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("python benchmarks/reservation_price.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
