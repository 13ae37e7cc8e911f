"""Decisions from a price quote and budget leases vs the central window market, offline.

The central mode prices every arriving request by clearing the window of
recent demand with it (``OnlineMarket.request``). The lease mode
(:mod:`clear_core.lease`) prices each request at an ingress replica from the
last quote it received (``caps_at_quote``, no clearing) and reserves against
the replica's budget lease; each replica reports every ``--sync-every`` of its
arrivals (the staleness, in arrivals) and at once when a cap does not fit its
lease, and the allocator re-clears the window on every report.

Both replay the same streams of the pool in the same order (oracle-noise
predictions, ``sigma`` 0.5; ``clear-cost-emp`` prices each prediction on its
bin's length histogram, calibrated out of fold as in ``clear-llm bench``),
one request at a time, each settled with the tokens it generates,
``min(recorded length, cap)``, ``--in-flight`` arrivals after its own (0: at
once; with requests in flight both modes price the caps they hold, the lease
mode from the open requests each replica reports); a query is solved iff
its cap covers its recorded length and the answer is correct. The per-query
budget has one block for the stream (``N * b``). Printed per (policy, budget):
accuracy of both, the gap in points, allocated and generated tokens against
``N * b``, and the largest ``reserved + leased + spent - granted`` seen after
any command (the invariant: never above 0). The last line is one JSON object.

    python benchmarks/online_price.py                          # 3 seeds x 4 streams x 4 budgets
    python benchmarks/online_price.py --replicas 4 --sync-every 32
    python benchmarks/online_price.py --policies clear-cost-emp --in-flight 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_core.budget import PerQueryBudget  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, non_negative_int, positive_int, run_command  # noqa: E402
from clear_core.lease import IngressMarket, answer_report  # noqa: E402
from clear_core.ledger import TokenLedger  # noqa: E402
from clear_core.online_market import DEFAULT_WINDOW_SIZE, OnlineMarket  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, load_pool, log_noise, make_stream, pool_streams  # noqa: E402

DEFAULT_POOL = REPO_ROOT.parent / "shared" / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
#: The serving pairs: clear on a cap budget (the paper's), clear-cost(-emp) on a refunding one.
MODES = {"clear": False, "clear-cost": True, "clear-cost-emp": True}


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _length_args(policy, bins, i) -> dict:
    return {"length_bin": int(bins[i])} if policy.prices_length_histograms else {}


def central_run(policy, tau, sigma, tokens, correct, b, refund, window, lengths=(), bins=None, in_flight=0):
    clock = Clock()
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=b, window_queries=len(tau), refund_unused=refund), clock)
    market = OnlineMarket(policy, ledger, window_size=window, context_limit_tokens=POOL_GENERATION_CAP_TOKENS,
                          lengths=lengths)
    caps = np.zeros(len(tau), dtype=np.int64)
    worst = -np.inf
    running: deque = deque()
    t0 = time.perf_counter()
    for i in range(len(tau)):
        clock.t = float(i)
        d = market.request(str(i), float(tau[i]), log_sigma=sigma, **_length_args(policy, bins, i))
        if d.admitted:
            caps[i] = d.cap_tokens
            running.append(i)
        while running and (running[0] <= i - in_flight or i == len(tau) - 1):  # ends in_flight arrivals later
            j = running.popleft()
            market.settle(str(j), int(min(tokens[j], caps[j])))
        st = ledger.state()
        worst = max(worst, st.reserved + st.leased + st.spent - st.granted)
    return caps, worst, time.perf_counter() - t0, ledger.state()


def lease_run(policy, tau, sigma, tokens, correct, b, refund, window, replicas, sync_every, block, lengths=(),
              bins=None, in_flight=0):
    clock = Clock()
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=b, window_queries=len(tau), refund_unused=refund), clock)
    market = OnlineMarket(policy, ledger, window_size=window, context_limit_tokens=POOL_GENERATION_CAP_TOKENS,
                          lengths=lengths)
    ingress = [IngressMarket(policy, f"r{k}", refund, POOL_GENERATION_CAP_TOKENS, lease_block_tokens=block,
                             lengths=lengths) for k in range(replicas)]

    def report(m, extra=0):
        rep = m.report(extra_tokens=extra)
        reply = answer_report(market, rep)
        m.apply(reply)
        return reply

    for m in ingress:
        report(m)
    caps = np.zeros(len(tau), dtype=np.int64)
    running: deque = deque()
    since = [0] * replicas
    worst, syncs = -np.inf, 0
    t0 = time.perf_counter()
    for i in range(len(tau)):
        clock.t = float(i)
        k = i % replicas
        m = ingress[k]
        ask = m.price(float(tau[i]), log_sigma=sigma, now=clock.t, **_length_args(policy, bins, i))
        refill = 0.0
        short = m.shortfall(ask)
        if short:  # the cap does not fit the lease: report now and ask for more
            reply = report(m, short)
            refill, syncs = reply.refill_s, syncs + 1
        d = m.admit(ask, str(i), refill_s=refill)
        if d.admitted:
            caps[i] = d.cap_tokens
            running.append(i)
        while running and (running[0] <= i - in_flight or i == len(tau) - 1):
            j = running.popleft()
            ingress[j % replicas].settle(str(j), int(min(tokens[j], caps[j])))
        since[k] += 1
        if since[k] >= sync_every:
            report(m)
            since[k], syncs = 0, syncs + 1
        st = ledger.state()
        worst = max(worst, st.reserved + st.leased + st.spent - st.granted)
    for m in ingress:  # the last reports: every token accounted for
        report(m)
    return caps, worst, time.perf_counter() - t0, ledger.state(), syncs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--traces", default=str(DEFAULT_POOL), help="oracle pool (JSONL)")
    p.add_argument("--n", type=positive_int, default=500, help="queries per stream")
    add_list_argument(p, "--budgets", kind=float, what="tokens per query", default="256,512,1024,2048",
                      help="budgets per query")
    add_list_argument(p, "--seeds", kind=int, what="seeds", default="0,1,2", help="stream and noise seeds")
    add_list_argument(p, "--policies", what="policies", default="clear,clear-cost,clear-cost-emp",
                      help="clear (on a cap budget), clear-cost and/or clear-cost-emp (on a refunding budget)")
    p.add_argument("--sigma", type=float, default=0.5, help="oracle-noise spread of the predictions")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW_SIZE, help="pricing window")
    p.add_argument("--replicas", type=positive_int, default=2, help="ingress replicas (round robin)")
    p.add_argument("--sync-every", type=positive_int, default=4, help="arrivals per replica between reports")
    p.add_argument("--lease-block", type=positive_int, default=16384, help="lease each replica tries to hold, tokens")
    p.add_argument("--in-flight", type=non_negative_int, default=0, help="arrivals between a request's own and its end")
    return p


def run(args) -> int:
    problems = load_pool(args.traces)
    rows = []
    for pol in args.policies:
        if pol not in MODES:
            raise SystemExit(f"error: --policies takes {sorted(MODES)}, not {pol!r}")
        policy, refund = parse_policy(pol), MODES[pol]
        if policy.prices_length_histograms:  # the bench's out-of-fold calibration of the noisy oracle, with its histograms
            from clear_bench.online import stream_inputs
            from clear_bench.predictions import parse_predictions

            preds = parse_predictions(f"oracle-noise:{args.sigma}", None, calibration="binned", problems=problems)
        for b in args.budgets:
            acc_c, acc_l, worst, alloc, gen, t_c, t_l, syncs = [], [], -np.inf, [0, 0], [0, 0], 0.0, 0.0, 0
            for seed in args.seeds:
                for name in pool_streams(problems):
                    s = make_stream(problems, name, args.n, seed)
                    tau = log_noise(s.tokens.astype(float), args.sigma, seed)
                    extra = {}
                    if policy.prices_length_histograms:
                        inp = stream_inputs(preds, s)
                        tau, extra = inp.raw, {"lengths": inp.histograms, "bins": inp.bins}
                    c_caps, c_worst, c_t, c_st = central_run(policy, tau, args.sigma, s.tokens, s.correct, b, refund,
                                                             args.window, in_flight=args.in_flight, **extra)
                    l_caps, l_worst, l_t, l_st, n_sync = lease_run(policy, tau, args.sigma, s.tokens, s.correct, b,
                                                                   refund, args.window, args.replicas,
                                                                   args.sync_every, args.lease_block,
                                                                   in_flight=args.in_flight, **extra)
                    acc_c.append(float(np.mean((c_caps >= s.tokens) & s.correct)))
                    acc_l.append(float(np.mean((l_caps >= s.tokens) & s.correct)))
                    worst = max(worst, c_worst, l_worst)
                    alloc[0] += c_st.allocated_total
                    alloc[1] += l_st.allocated_total
                    gen[0] += c_st.generated_total
                    gen[1] += l_st.generated_total
                    t_c, t_l, syncs = t_c + c_t, t_l + l_t, syncs + n_sync
            runs = len(acc_c)
            nb = b * args.n * runs
            row = dict(policy=pol, refund_unused=refund, budget_per_query=b, runs=runs,
                       central_accuracy=float(np.mean(acc_c)), lease_accuracy=float(np.mean(acc_l)),
                       gap_points=100 * float(np.mean(acc_l) - np.mean(acc_c)),
                       worst_cell_gap_points=100 * float(np.min(np.subtract(acc_l, acc_c))),
                       central_allocated_per_budget=alloc[0] / nb, lease_allocated_per_budget=alloc[1] / nb,
                       central_generated_per_budget=gen[0] / nb, lease_generated_per_budget=gen[1] / nb,
                       max_overshoot_tokens=float(worst), reports=syncs,
                       central_decisions_per_s=runs * args.n / t_c, lease_decisions_per_s=runs * args.n / t_l)
            rows.append(row)
            print(f"{pol:10s} b={b:6.0f}  accuracy central {row['central_accuracy']:.3f}  lease "
                  f"{row['lease_accuracy']:.3f}  gap {row['gap_points']:+.2f} pts (worst cell "
                  f"{row['worst_cell_gap_points']:+.2f})  allocated/Nb {row['central_allocated_per_budget']:.3f} / "
                  f"{row['lease_allocated_per_budget']:.3f}  generated/Nb {row['central_generated_per_budget']:.3f} / "
                  f"{row['lease_generated_per_budget']:.3f}  max overshoot {row['max_overshoot_tokens']:.0f}  "
                  f"decisions/s {row['central_decisions_per_s']:.0f} / {row['lease_decisions_per_s']:.0f}", flush=True)
    print(json.dumps({"replicas": args.replicas, "sync_every": args.sync_every, "lease_block": args.lease_block,
                      "window": args.window, "n": args.n, "in_flight": args.in_flight, "rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("online_price.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
