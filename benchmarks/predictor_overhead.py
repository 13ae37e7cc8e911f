"""What the learned predictor costs a request: the encoder in process, and the embedded default over HTTP.

Prints:

1. **The encoder in process, where the time goes** (one thread, one prompt at a time as a request path sees
   them, and batches of 32): tokenisation, the encoder's forward pass and the head with its calibration, per
   prompt, for torch and ONNX Runtime, on the main pool's prompts and on the short prompts of part 2; and
   prompts per second per core.
2. **Agreement**: the largest difference in predicted log length between the two runtimes over every prompt
   of the main pool (``--agreement-prompts`` of them; 0 skips it).
3. **The embedded default over HTTP against a trivial graph**, side by side in one run: ``serve_config.yaml``'s
   application (the minilm-ridge predictor, the length learner, decisions at the ingress) with the replay
   engine's prefill at 0 and no decode delay (the trivial graph has neither), for each predictor placement of
   ``--placements``; a new prompt on every request (nothing can be answered from a cache), ``max_tokens`` 1.
   Latency at concurrency 1 (p50, p99, the p50 added over the trivial graph) and requests per second at
   concurrency 32 (its ratio to the trivial graph's); the share of requests the learned predictor priced.
4. **The first request after a deploy**: who priced it (``clear.prediction_source``) and how long it took.

    python benchmarks/predictor_overhead.py [--requests 400] [--placements ingress,deployment]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.local_serve import local_serve  # noqa: E402
from benchmarks.serving_overhead import MODEL, engine_args, http_run, pct, short_prompt, trivial_app  # noqa: E402
from clear_core.cli_args import HelpFormatter, add_list_argument, one_of, positive_int, run_command  # noqa: E402

DEFAULT_POOL = REPO_ROOT.parent / "shared" / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
PLACEMENTS = ("ingress", "deployment")


def _encoders(max_length: int) -> dict:
    import torch

    from clear_predictor.head_predictor import make_encoder

    torch.set_num_threads(1)
    return {"torch": make_encoder(max_length, "cpu", runtime="torch"),
            "onnx": make_encoder(max_length, "cpu", runtime="onnx", threads=1)}


def profile(encoders: dict, head, prompts: list[str], label: str) -> None:
    """Per-prompt time of each stage, one prompt at a time, and prompts per second in batches of 32."""
    from clear_predictor.batching import tokenize

    print(f"\n### {label}: {len(prompts)} prompts, one thread, ms per prompt")
    print("| runtime | tokenise | encoder forward | head + calibration | total, one at a time | prompts/s/core, "
          "one at a time | prompts/s/core, batches of 32 |")
    print("|---|---|---|---|---|---|---|")
    model = head.length_model()
    for name, enc in encoders.items():
        enc.encode(prompts[:4])  # warm
        t_tok = t_all = t_head = 0.0
        for p in prompts:
            t0 = time.perf_counter()
            tokenize(enc.tokenizer, [p], enc.max_length)
            t1 = time.perf_counter()
            x = enc.encode([p])  # tokenises again: the forward pass is the difference
            t2 = time.perf_counter()
            model.predict(x)
            t3 = time.perf_counter()
            t_tok, t_all, t_head = t_tok + (t1 - t0), t_all + (t2 - t1), t_head + (t3 - t2)
        n = len(prompts)
        t0 = time.perf_counter()
        for i in range(0, n, 32):
            model.predict(enc.encode(prompts[i:i + 32]))
        batched = n / (time.perf_counter() - t0)
        per = 1e3 / n
        print(f"| {name} | {t_tok * per:.2f} | {(t_all - t_tok) * per:.2f} | {t_head * per:.3f} | "
              f"{(t_all + t_head) * per:.2f} | {n / (t_all + t_head):.0f} | {batched:.0f} |", flush=True)


def agreement(encoders: dict, head, prompts: list[str]) -> None:
    t0 = time.perf_counter()
    a = head.predict_log(encoders["torch"].encode(prompts))
    b = head.predict_log(encoders["onnx"].encode(prompts))
    d = np.abs(a - b)
    print(f"\nAgreement over {len(prompts)} main-pool prompts: max |log length (onnx) - log length (torch)| "
          f"{d.max():.2e}, mean {d.mean():.2e} ({time.perf_counter() - t0:.0f} s)")


def embedded_default_args(placement: str, state_dir: str, backend: str = "minilm-ridge") -> dict:
    """serve_config.yaml's application args, its engine without prefill or decode delay, books in ``state_dir``."""
    import yaml

    doc = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    args = copy.deepcopy(doc["applications"][0]["args"])
    args["model_name"] = MODEL
    args["engine"] = {**args["engine"], **engine_args()}
    args["allocator"]["budget_name"] = None  # fresh books on every deploy
    args["allocator"].setdefault("advanced", {})["state_dir"] = state_dir
    args["predictor"]["placement"] = placement
    args["predictor"]["backend"] = backend
    args.setdefault("learner", {}).setdefault("advanced", {})["log_url"] = os.path.join(state_dir, f"log-{placement}")
    args["ingress"] = {**args.get("ingress", {}), "deployment": {"min_replicas": 1, "max_ongoing_requests": 512}}
    return args


def over_http(args) -> None:
    import httpx
    from ray import serve

    from deployments.app import build_app

    c_lat, c_rate = args.concurrency[0], args.concurrency[-1]
    counter = 10_000_000  # prompts never repeat across rows, graphs or the trivial graph
    with local_serve() as port:
        serve.run(trivial_app(), name="trivial", route_prefix="/trivial")
        base = f"http://127.0.0.1:{port}/trivial"
        asyncio.run(http_run(base, 40, 4))
        print(f"\n## The embedded default against the trivial graph: latency at concurrency {c_lat}, rate at "
              f"{c_rate}, {args.requests} requests each, distinct prompts, ms")
        print("| graph | e2e p50 | e2e p99 | added p50 over trivial | CLEAR's own predict / decide p50 | requests/s | "
              "rate / trivial | priced by the learned predictor |")
        print("|---|---|---|---|---|---|---|---|")
        first = []
        graphs = [("minilm-ridge", p) for p in args.placements] + (
            [("heuristic", "ingress")] if args.heuristic_row else [])
        with tempfile.TemporaryDirectory() as state:
            for backend, placement in graphs:
                name = f"default-{backend}-{placement}"
                serve.run(build_app(embedded_default_args(placement, state, backend)), name=name,
                          route_prefix=f"/{name}")
                url = f"http://127.0.0.1:{port}/{name}"
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                    "model": MODEL, "messages": [{"role": "user", "content": "The first question after a deploy."}],
                    "max_tokens": 1})
                if backend == "minilm-ridge":
                    first.append((placement, r.status_code, r.json().get("clear", {}).get("prediction_source"),
                                  1e3 * (time.perf_counter() - t0)))
                asyncio.run(http_run(url, 40, 4, counter))  # warm up
                counter += 40
                rows = {}
                for graph, target in (("trivial", base), ("clear", url)):
                    src: list = []
                    e2e, added, pred, _ = asyncio.run(http_run(target, args.requests, c_lat, counter, src))
                    counter += args.requests
                    _, _, _, rate = asyncio.run(http_run(target, args.requests, c_rate, counter, src))
                    counter += args.requests
                    rows[graph] = (e2e, added, pred, src, rate)
                b_e2e, *_, b_rate = rows["trivial"]
                label = (f"embedded default, predictor placement {placement}" if backend == "minilm-ridge" else
                         "embedded default with the prompt-length heuristic in the ingress")
                for graph, text in (("trivial", "trivial (ingress -> engine)"), ("clear", label)):
                    e2e, added, pred, src, rate = rows[graph]
                    own = (f"{pct(pred, 50):.2f} / {pct(np.subtract(added, pred), 50):.2f}" if graph == "clear"
                           else "-")
                    learned = (f"{100.0 * np.mean([x == 'minilm-ridge' for x in src]):.1f}%"
                               if graph == "clear" and backend == "minilm-ridge" else "-")
                    print(f"| {text} | {pct(e2e, 50):.2f} | {pct(e2e, 99):.2f} | {pct(e2e, 50) - pct(b_e2e, 50):+.2f} | "
                          f"{own} | {rate:.1f} | {rate / b_rate:.2f} | {learned} |", flush=True)
                serve.delete(name)
        print("\n## The first request after a deploy")
        for placement, status, source, ms in first:
            print(f"placement {placement}: HTTP {status}, prediction_source {source}, {ms:.0f} ms")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/predictor_overhead.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--requests", type=positive_int, default=400, help="requests per latency and rate row")
    add_list_argument(ap, "--concurrency", kind=positive_int, what="positive integers", metavar="N", default="1,32",
                      help="concurrent clients: the first gives the latency row, the last the rate row")
    add_list_argument(ap, "--placements", kind=one_of(PLACEMENTS),
                      what=f"one of {', '.join(PLACEMENTS)}", metavar="PLACEMENT", default=",".join(PLACEMENTS),
                      help=f"predictor placements of the embedded default to compare: {', '.join(PLACEMENTS)}")
    ap.add_argument("--traces", default=str(DEFAULT_POOL), help="pool whose prompts part 1 and 2 use")
    ap.add_argument("--profile-prompts", type=positive_int, default=200, help="prompts per profile row")
    ap.add_argument("--agreement-prompts", type=int, default=-1,
                    help="main-pool prompts compared between runtimes (-1: all of them; 0: skip)")
    ap.add_argument("--no-http", action="store_true", help="parts 1 and 2 only")
    ap.add_argument("--heuristic-row", action="store_true",
                    help="part 3 also runs the embedded default with the prompt-length heuristic in the ingress "
                    "(what the rest of the graph costs)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _run(args) -> int:
    from clear_core.traces import load_pool
    from clear_predictor.head import load_head

    head = load_head()
    texts = [p.problem for p in load_pool(args.traces)]
    encoders = _encoders(head.max_length)
    print("## The encoder in process (CPU: one intra-op thread)")
    rng = np.random.default_rng(0)
    profile(encoders, head, [texts[i] for i in rng.choice(len(texts), args.profile_prompts, replace=False)],
            "main-pool prompts")
    profile(encoders, head, [short_prompt(i) for i in range(args.profile_prompts)], "part 3's short prompts")
    if args.agreement_prompts:
        agreement(encoders, head, texts if args.agreement_prompts < 0 else texts[:args.agreement_prompts])
    del encoders
    if not args.no_http:
        over_http(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
