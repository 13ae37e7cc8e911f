"""GPU smoke test: the CLEAR graph with real vLLM replicas (Ray Serve LLM) answers capped requests.

Run on a machine with a GPU, vLLM and ``ray[serve,llm]`` installed:

    python scripts/gpu_smoke_test.py                          # tiny Qwen2.5 from the HF hub
    python scripts/gpu_smoke_test.py --model-source /models/qwen --dummy-weights

It starts a local Ray, deploys ``build_app`` with the vllm engine (heuristic
predictor, CLEAR at 512 tokens per query), sends chat and streaming requests
through the official ``openai`` client, and checks: every admitted response's
``usage.completion_tokens`` <= ``clear.allocated_tokens`` <= the client's
``max_tokens``; a request whose cap is smaller than its answer stops with
``finish_reason == "length"``; the ledger ends with nothing reserved. Exit code 0
on success. ``--dummy-weights`` loads random weights from a ``config.json`` (no
download; pair with ``--ignore-eos`` so lengths equal the caps).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-source", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--model-name", default="smoke-model")
    ap.add_argument("--dummy-weights", action="store_true", help="load_format=dummy (random weights)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args(argv)

    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm is not installed: this smoke test needs a GPU machine with the vllm extra", file=sys.stderr)
        return 2
    import httpx
    import openai
    import ray
    from ray import serve

    from deployments.app import build_app

    engine_kwargs = {"max_model_len": 4096, "gpu_memory_utilization": 0.8, "enforce_eager": True}
    if args.dummy_weights:
        engine_kwargs["load_format"] = "dummy"
    app_args = {
        "model_name": args.model_name,
        "context_limit_tokens": 4096,
        "max_completion_tokens": 2048,
        "allocator": {"policy": "clear", "budget": {"mode": "per_query", "tokens_per_query": 512, "window_queries": 1000}},
        "engine": {
            "kind": "vllm",
            "model_source": args.model_source,
            "min_replicas": 1,
            "max_replicas": 1,
            "advanced": {"ignore_eos": args.ignore_eos},
            "llm_config": {"engine_kwargs": engine_kwargs},
        },
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    failures = []
    try:
        t0 = time.time()
        serve.run(build_app(app_args), name="smoke", route_prefix="/")
        print(f"deployed in {time.time() - t0:.0f}s")
        base = f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        for i in range(args.requests):
            client_max = [16, 64, 256, 1024][i % 4]
            r = c.chat.completions.create(
                model=args.model_name,
                messages=[{"role": "user", "content": f"Explain step by step why {i} + {i} = {2 * i}."}],
                max_tokens=client_max,
            )
            cl = r.model_extra["clear"]
            ok = r.usage.completion_tokens <= cl["allocated_tokens"] <= client_max
            if r.usage.completion_tokens == cl["allocated_tokens"] and r.choices[0].finish_reason != "length":
                ok = False
            print(f"{i:3d} max {client_max:5d} cap {cl['allocated_tokens']:5d} used {r.usage.completion_tokens:5d} "
                  f"finish {r.choices[0].finish_reason} price {cl['shadow_price']:.3g} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(i)
        parts = list(c.chat.completions.create(
            model=args.model_name, messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=64, stream=True
        ))
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        print(f"stream: {len(parts)} chunks, {len(text)} chars")
        if not text:
            failures.append("stream")
        time.sleep(1.0)
        st = httpx.get(f"{base}/v1/clear/status").json()
        print(f"ledger: {st}")
        if st["in_flight_reservations"] != 0 or not st["invariant_holds"]:
            failures.append("ledger")
    finally:
        serve.shutdown()
        ray.shutdown()
    print("FAILED" if failures else "PASSED", failures or "")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
