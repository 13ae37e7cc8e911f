"""``python -m load_tests``: drive live endpoints with a traffic stream and compare them.

Example (two deployments of the embedded default, one per policy)::

    python -m load_tests --target uniform=http://127.0.0.1:8000/uniform --target clear=http://127.0.0.1:8000/clear \\
        --traces ../shared/data/traces/r1-distill-qwen-7b-mix.jsonl --stream balanced --queries 500 \\
        --concurrency 32 --out artifacts/load-balanced

Targets run one after another on the same stream, so they never compete for
the machine; each is bounded by --queries and --max-duration-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from tqdm import tqdm

from clear_core.traces import MIXTURES, load_pool
from load_tests.driver import LoadConfig, run_load
from load_tests.report import side_by_side, summarize, write_figures, write_run
from load_tests.traffic import plan_stream


def parse_target(text: str) -> tuple[str, str]:
    label, eq, url = text.partition("=")
    if not eq or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected LABEL=URL, got {text!r}")
    return label, url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", type=parse_target, required=True, help="LABEL=BASE_URL (repeatable)")
    p.add_argument("--traces", required=True, help="oracle pool JSONL the stream is drawn from")
    p.add_argument("--stream", default="balanced", choices=sorted(MIXTURES))
    p.add_argument("--queries", type=int, default=500, help="requests per target (the stream size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=32, help="clients, or max in flight with --rate")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (open loop)")
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=None, help="client max_tokens sent with every request")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--status-interval-s", type=float, default=1.0,
                   help="poll /v1/clear/status this often during the run (0: never)")
    p.add_argument("--no-replay-samples", action="store_true", help="don't name the recorded sample (real engines)")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_stream(load_pool(args.traces), args.stream, args.queries, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries, runs, statuses = {}, {}, {}
    for label, url in args.target:
        cfg = LoadConfig(
            base_url=url, model=args.model, mode="rate" if args.rate else "concurrency",
            concurrency=args.concurrency, rate_rps=args.rate or 0.0, max_requests=args.queries,
            max_duration_s=args.max_duration_s, request_timeout_s=args.request_timeout_s,
            max_tokens=args.max_tokens, api_key=args.api_key, replay_samples=not args.no_replay_samples,
            seed=args.seed, status_interval_s=args.status_interval_s,
        )
        with tqdm(total=len(plan), desc=label, unit="req") as bar:
            solved = [0]

            def tick(rec, bar=bar, solved=solved):
                solved[0] += rec.solved
                bar.update(1)
                bar.set_postfix(solved=solved[0], last=rec.status)

            t0 = time.perf_counter()
            status: list[dict] = []
            records = asyncio.run(run_load(cfg, plan, progress=tick, status_samples=status))
            wall = time.perf_counter() - t0
        runs[label], statuses[label] = records, status
        summaries[label] = summarize(records, wall)
        write_run(args.out, label, records, status)
    table = side_by_side(summaries)
    header = (f"# Load test: stream `{args.stream}`, {args.queries} requests, seed {args.seed}, "
              + (f"Poisson {args.rate}/s" if args.rate else f"{args.concurrency} concurrent clients") + "\n\n")
    (args.out / "summary.md").write_text(header + table + "\n")
    (args.out / "summary.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                       "targets": summaries}, indent=1))
    write_figures(args.out, runs, statuses)
    print(header + table)
    return 0
