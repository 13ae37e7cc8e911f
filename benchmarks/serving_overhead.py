"""What CLEAR adds to a request, and how many allocation decisions the allocator sustains.

Prints three tables (run on the machine at hand; the numbers in the README were
taken on a 2-core CI-sized machine):

1. **Added latency.** The same requests through the full service (HTTP ->
   ingress -> predictor -> allocator -> replay engine) and straight to the
   replay engine through a Serve handle. The ingress times the predictor call
   and the allocator call of every request (``clear.timing_ms``): their sum is
   the latency CLEAR adds on the critical path (p50 / p99). End-to-end p50 / p99
   of both paths are printed beside it (the difference also contains HTTP, the
   proxy and the ingress, which any OpenAI server has). The replay engine runs
   with no decode delay so the engine itself costs ~nothing.
2. **Decisions per second, in process:** ``OnlineMarket.request`` + settle in a
   loop (the allocator's own work, no Ray), per policy.
3. **Decisions per second through Serve:** many concurrent
   ``Allocator.reserve`` + ``settle`` handle calls on the one allocator replica.

    python benchmarks/serving_overhead.py [--requests 400] [--concurrency 1,32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_bench.cli import policy_list  # noqa: E402
from clear_core.budget import PerQueryBudget  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, positive_int, run_command  # noqa: E402
from clear_core.ledger import TokenLedger  # noqa: E402
from clear_core.online_market import OnlineMarket  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def in_process_rate(policy: str, n: int, window: int) -> float:
    rng = np.random.default_rng(0)
    tau = np.exp(rng.normal(6.5, 1.2, n))
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=512.0, window_queries=n))
    m = OnlineMarket(parse_policy(policy), ledger, window_size=window,
                     context_limit_tokens=POOL_GENERATION_CAP_TOKENS)
    t0 = time.perf_counter()
    for i in range(n):
        d = m.request(str(i), float(tau[i]), log_sigma=0.5)
        if d.admitted:
            ledger.settle(str(i), d.cap_tokens // 2)
    return n / (time.perf_counter() - t0)


def app_args(policy: str) -> dict:
    return {
        "allocator": {"policy": policy, "budget": {"mode": "per_query", "tokens_per_query": 512.0, "window_queries": 1_000_000}},
        "engine": {
            "kind": "replay",
            "decode_tokens_per_s": 1e9,
            "time_to_first_token_s": 0.0,
            "stream_chunk_tokens": 4096,
            "max_concurrent_requests": 256,
            "deployment": {"num_replicas": 1, "max_ongoing_requests": 256},
        },
        "ingress": {"deployment": {"num_replicas": 1, "max_ongoing_requests": 512}},
    }


async def http_latencies(url: str, n: int, concurrency: int) -> tuple[list, list, list]:
    import httpx

    e2e, added, pred = [], [], []
    idx = iter(range(n))

    async def worker(c):
        for i in idx:
            body = {"model": "clear-replay", "messages": [{"role": "user", "content": f"Problem {i}: add {i} and 3."}], "max_tokens": 64}
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                tm = r.json()["clear"]["timing_ms"]
                e2e.append(1e3 * dt)
                added.append(tm["predict"] + tm["allocate"])
                pred.append(tm["predict"])

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return e2e, added, pred


async def direct_latencies(engine, n: int, concurrency: int) -> list:
    from deployments.engines.base import EngineRequest

    out = []
    idx = iter(range(n))

    async def worker():
        for i in idx:
            req = EngineRequest(request_id=f"d{i}", kind="chat", prompt=f"Problem {i}: add {i} and 3.", messages=None, cap_tokens=64, model="clear-replay")
            t0 = time.perf_counter()
            async for _ in engine.options(stream=True).generate.remote(req):
                pass
            out.append(1e3 * (time.perf_counter() - t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def serve_decision_rate(allocator, n: int, concurrency: int) -> float:
    rng = np.random.default_rng(1)
    tau = np.exp(rng.normal(6.5, 1.2, n))
    idx = iter(range(n))

    async def worker():
        for i in idx:
            d = await allocator.reserve.remote(f"b{i}", float(tau[i]), 0.5, None)
            if d.admitted:
                await allocator.settle.remote(f"b{i}", d.cap_tokens // 2)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/serving_overhead.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--requests", type=positive_int, default=400, help="requests per latency row")
    add_list_argument(ap, "--concurrency", kind=positive_int, what="positive integers", metavar="N", default="1,32",
                      help="concurrent clients, one latency row each")
    add_list_argument(ap, "--policies", kind=policy_list, metavar="SPEC", default="clear,uniform", help="policy specs")
    ap.add_argument("--decisions", type=positive_int, default=2000, help="allocator decisions per rate measurement")
    ap.add_argument("--window", type=positive_int, default=256, help="pricing window (recent thresholds)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _run(args) -> int:

    import ray
    from ray import serve

    from deployments.app import build_app

    print("## Allocation decisions per second, in process (OnlineMarket.request + settle)")
    for policy in args.policies:
        rate = in_process_rate(policy, args.decisions, args.window)
        print(f"{policy:>8}: {rate:8.0f} decisions/s (pricing window {args.window}, log_sigma 0.5)")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for policy in args.policies:
            name = f"overhead-{policy}"
            serve.run(build_app(app_args(policy)), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}"
            engine = serve.get_deployment_handle("ReplayEngine", app_name=name)
            allocator = serve.get_deployment_handle("Allocator", app_name=name)
            asyncio.run(http_latencies(url, 40, 4))  # warm up
            asyncio.run(direct_latencies(engine, 40, 4))
            print(f"\n## Latency, policy {policy}, {args.requests} requests per row, ms")
            print("| concurrency | CLEAR added p50 | CLEAR added p99 | of which predictor p50 | e2e via CLEAR p50 | e2e via CLEAR p99 | engine direct p50 | engine direct p99 |")
            print("|---|---|---|---|---|---|---|---|")
            for c in args.concurrency:
                e2e, added, pred = asyncio.run(http_latencies(url, args.requests, c))
                direct = asyncio.run(direct_latencies(engine, args.requests, c))
                print(
                    f"| {c} | {pct(added, 50):.1f} | {pct(added, 99):.1f} | {pct(pred, 50):.1f} | {pct(e2e, 50):.1f} | {pct(e2e, 99):.1f} | "
                    f"{pct(direct, 50):.1f} | {pct(direct, 99):.1f} |",
                    flush=True,
                )
            rate = asyncio.run(serve_decision_rate(allocator, args.decisions, 64))
            print(f"\nAllocator through Serve ({policy}): {rate:.0f} decisions/s (reserve + settle, 64 concurrent callers)")
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
