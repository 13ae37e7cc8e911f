"""What CLEAR adds to a request, side by side with a trivial graph of the same shape, and decision rates.

Prints (run on the machine at hand; the numbers in docs/results/serving.md were taken on a 2-core CI-sized machine):

1. **Decisions per second, in process:** the central window market
   (``OnlineMarket.request`` + settle) and a decision from a price quote and a
   budget lease (``IngressMarket.price`` + ``admit`` + settle), per policy.
2. **Graphs over HTTP, side by side in one run:** a *trivial graph* (a FastAPI
   ingress that passes the request to the same replay engine deployment and
   answers its text: no prediction, no budget) and the CLEAR graph in each
   configuration asked for (``--graphs``):

   * ``central``: every request calls the predictor deployment and the allocator;
   * ``ingress``: decisions at the ingress from a quote and a lease
     (``allocator.decisions: ingress``), the predictor still a deployment;
   * ``ingress-local``: the same with the predictor's backend in the ingress
     (``predictor.placement: ingress``).

   Small chat requests (``max_tokens`` 1, the replay engine with no decode
   delay, so the engine costs ~nothing). Per graph: latency at concurrency 1
   (p50 / p99 over ``--requests``) and the p50 added over the trivial graph;
   requests per second at ``--throughput-concurrency`` clients and its ratio to
   the trivial graph's; CLEAR's own timing (``clear.timing_ms``, predictor +
   decision). For ``ingress`` graphs, the age of the price quote each decision
   acted on (``/v1/clear/status``: the price staleness).
3. **Decisions per second through Serve** of the one central allocator (reserve
   + settle handle calls from 64 concurrent callers).

The predictor is the prompt-length heuristic here (``--predictor``): the
question is what the allocation path costs. The shipped MiniLM head's own cost
is ``benchmarks/predictor_speed.py``'s.

    python benchmarks/serving_overhead.py [--requests 400] [--graphs central,ingress,ingress-local]
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

from fastapi import Request  # noqa: E402  (module level: the trivial ingress's annotation resolves here)

from clear_bench.cli import policy_list  # noqa: E402
from clear_core.budget import PerQueryBudget  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, one_of, positive_int, run_command  # noqa: E402
from clear_core.lease import IngressMarket, answer_report  # noqa: E402
from clear_core.ledger import TokenLedger  # noqa: E402
from clear_core.online_market import OnlineMarket  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


GRAPHS = ("central", "ingress", "ingress-local")
MODEL = "clear-replay"


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


def in_process_quote_rate(policy: str, n: int, window: int, report_every: int = 32) -> float:
    """Decisions from a quote and a lease (with a report to an in-process allocator every ``report_every``)."""
    rng = np.random.default_rng(0)
    tau = np.exp(rng.normal(6.5, 1.2, n))
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=512.0, window_queries=n))
    central = OnlineMarket(parse_policy(policy), ledger, window_size=window,
                           context_limit_tokens=POOL_GENERATION_CAP_TOKENS)
    m = IngressMarket(parse_policy(policy), "r0", False, POOL_GENERATION_CAP_TOKENS, lease_block_tokens=1 << 20)
    m.apply(answer_report(central, m.report()))
    t0 = time.perf_counter()
    for i in range(n):
        ask = m.price(float(tau[i]), log_sigma=0.5)
        if m.shortfall(ask) or i % report_every == 0:
            m.apply(answer_report(central, m.report(extra_tokens=m.shortfall(ask))))
        d = m.admit(ask, str(i))
        if d.admitted:
            m.settle(str(i), d.cap_tokens // 2)
    return n / (time.perf_counter() - t0)


def engine_args() -> dict:
    return {
        "kind": "replay",
        "advanced": {"decode_tokens_per_s": 1e9, "time_to_first_token_s": 0.0, "stream_chunk_tokens": 4096,
                     "max_concurrent_requests": 256},
        "deployment": {"min_replicas": 1, "max_ongoing_requests": 256},
    }


def app_args(policy: str, graph: str = "central", predictor: str = "heuristic") -> dict:
    allocator = {"policy": policy, "budget": {"mode": "per_query", "tokens_per_query": 512.0,
                                              "window_queries": 1_000_000}}
    if graph != "central":
        allocator["decisions"] = "ingress"
    return {
        "model_name": MODEL,
        "allocator": allocator,
        "predictor": {"backend": predictor, "placement": "ingress" if graph == "ingress-local" else "deployment"},
        "engine": engine_args(),
        "ingress": {"deployment": {"min_replicas": 1, "max_ongoing_requests": 512}},
    }


def trivial_app():
    """FastAPI ingress -> the same replay engine deployment, nothing else (the ceiling CLEAR is compared with)."""
    import uuid

    from fastapi import FastAPI
    from ray import serve

    from deployments.config import ReplayEngineConfig
    from deployments.engines.base import EngineRequest
    from deployments.engines.replay import ReplayEngine

    api = FastAPI()

    class TrivialIngress:
        def __init__(self, engine):
            self.engine = engine

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request):
            body = await request.json()
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            req = EngineRequest(request_id=rid, kind="chat", prompt=body["messages"][-1]["content"], messages=None,
                                cap_tokens=int(body.get("max_tokens") or 16), model=MODEL)
            text, tokens, finish = [], 0, None
            async for chunk in self.engine.options(stream=True).generate.remote(req):
                text.append(chunk.text)
                tokens += chunk.tokens
                finish = chunk.finish_reason or finish
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}}

    ecfg = ReplayEngineConfig.model_validate(engine_args())
    engine = serve.deployment(ReplayEngine, **ecfg.deployment.serve_options("ReplayEngine")).bind(ecfg, MODEL)
    ingress = serve.deployment(serve.ingress(api)(TrivialIngress), name="TrivialIngress", num_replicas=1,
                               max_ongoing_requests=512)
    return ingress.bind(engine)


def short_prompt(i: int) -> str:
    """The ``i``-th request's prompt: a new one for every ``i``."""
    return f"Problem {i}: add {i} and 3."


async def http_run(url: str, n: int, concurrency: int, start: int = 0,
                   sources: list | None = None) -> tuple[list, list, list, float]:
    """(e2e ms, CLEAR added ms, predictor ms, requests/s) of ``n`` small chat requests, prompts ``start`` to
    ``start + n - 1``; ``sources`` collects each answer's ``clear.prediction_source``."""
    import httpx

    e2e, added, pred = [], [], []
    idx = iter(range(start, start + n))

    async def worker(c):
        for i in idx:
            body = {"model": MODEL, "messages": [{"role": "user", "content": short_prompt(i)}], "max_tokens": 1}
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:200]}")
            e2e.append(1e3 * dt)
            if sources is not None:
                sources.append(r.json().get("clear", {}).get("prediction_source", "-"))
            tm = r.json().get("clear", {}).get("timing_ms")
            if tm:
                added.append(tm["predict"] + tm["allocate"])
                pred.append(tm["predict"])

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        rate = n / (time.perf_counter() - t0)
    return e2e, added, pred, rate


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
    ap.add_argument("--requests", type=positive_int, default=400, help="requests per latency and rate row")
    add_list_argument(ap, "--concurrency", kind=positive_int, what="positive integers", metavar="N", default="1,32",
                      help="concurrent clients: the first gives the latency row, the last the rate row")
    add_list_argument(ap, "--policies", kind=policy_list, metavar="SPEC", default="clear", help="policy specs")
    add_list_argument(ap, "--graphs", kind=one_of(GRAPHS),
                      what=f"one of {', '.join(GRAPHS)}", metavar="GRAPH", default=",".join(GRAPHS),
                      help=f"CLEAR graphs to compare with the trivial one: {', '.join(GRAPHS)}")
    ap.add_argument("--predictor", default="heuristic", choices=["heuristic", "minilm-ridge"],
                    help="predictor backend of the CLEAR graphs")
    ap.add_argument("--decisions", type=positive_int, default=2000, help="allocator decisions per rate measurement")
    ap.add_argument("--window", type=positive_int, default=256, help="pricing window (recent thresholds)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _row(name, e2e, added, pred, rate, base_p50, base_rate) -> str:
    clear = f"{pct(added, 50):.2f} / {pct(added, 99):.2f} / {pct(pred, 50):.2f}" if added else "-"
    return (f"| {name} | {pct(e2e, 50):.2f} | {pct(e2e, 99):.2f} | {pct(e2e, 50) - base_p50:+.2f} | {clear} | "
            f"{rate:.1f} | {rate / base_rate:.2f} |")


def _run(args) -> int:
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_app

    print("## Allocation decisions per second, in process")
    for policy in args.policies:
        central = in_process_rate(policy, args.decisions, args.window)
        try:
            quoted = f"{in_process_quote_rate(policy, args.decisions, args.window):8.0f}"
        except Exception as exc:  # a policy without quotes (clear-paper)
            quoted = f"n/a ({type(exc).__name__})"
        print(f"{policy:>8}: window market {central:8.0f} decisions/s; from a quote and a lease {quoted} "
              f"decisions/s (pricing window {args.window}, log_sigma 0.5)")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    c_lat, c_rate = args.concurrency[0], args.concurrency[-1]
    try:
        serve.run(trivial_app(), name="trivial", route_prefix="/trivial")
        base_url = f"http://127.0.0.1:{port}/trivial"
        asyncio.run(http_run(base_url, 40, 4))
        for policy in args.policies:
            print(f"\n## Graphs over HTTP, policy {policy}, predictor {args.predictor}: latency at concurrency "
                  f"{c_lat}, rate at {c_rate}, {args.requests} requests each, ms")
            print("| graph | e2e p50 | e2e p99 | added p50 over trivial | CLEAR predict+decide p50 / p99 / "
                  "of which predict p50 | requests/s | rate / trivial |")
            print("|---|---|---|---|---|---|---|")
            central_rate = None
            for graph in args.graphs:  # one CLEAR graph at a time beside the trivial one (2 CPUs hold no more)
                name = f"overhead-{graph}-{policy.replace(':', '_').replace(',', '_').replace('=', '')}"
                serve.run(build_app(app_args(policy, graph, args.predictor)), name=name, route_prefix=f"/{name}")
                url = f"http://127.0.0.1:{port}/{name}"
                asyncio.run(http_run(url, 40, 4))  # warm up
                # Side by side: the trivial graph's rows are measured again right before each CLEAR graph's.
                base_e2e, _, _, _ = asyncio.run(http_run(base_url, args.requests, c_lat))
                _, _, _, base_rate = asyncio.run(http_run(base_url, args.requests, c_rate))
                e2e, added, pred, _ = asyncio.run(http_run(url, args.requests, c_lat))
                _, _, _, rate = asyncio.run(http_run(url, args.requests, c_rate))
                print(_row("trivial (ingress -> engine)", base_e2e, [], [], base_rate, pct(base_e2e, 50), base_rate))
                print(_row(f"CLEAR {graph}", e2e, added, pred, rate, pct(base_e2e, 50), base_rate), flush=True)
                if graph != "central":
                    st = httpx.get(f"{url}/v1/clear/status", timeout=30).json()
                    age = st["ingress"]["decision_quote_age_s"]
                    print(f"|   price staleness ({graph}): age of the quote a decision acted on p50 "
                          f"{1e3 * age['p50']:.1f} ms, p99 {1e3 * age['p99']:.1f} ms, max {1e3 * age['max']:.1f} ms "
                          f"over {age['n']} decisions; reports {st['ingress']['reports']} |")
                else:
                    allocator = serve.get_deployment_handle("Allocator", app_name=name)
                    central_rate = asyncio.run(serve_decision_rate(allocator, args.decisions, 64))
                serve.delete(name)
            if central_rate is not None:
                print(f"\nThe central allocator through Serve ({policy}): {central_rate:.0f} decisions/s (reserve + "
                      "settle, 64 concurrent callers)")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
