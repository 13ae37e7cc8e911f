"""``python -m load_tests``: drive live endpoints with a traffic stream and compare them.

Example (two deployments of the embedded default, one per policy)::

    python -m load_tests --target uniform=http://127.0.0.1:8000/uniform --target clear=http://127.0.0.1:8000/clear \\
        --traces ../shared/data/traces/r1-distill-qwen-7b-mix.jsonl --stream balanced --queries 500 \\
        --concurrency 32 --out artifacts/load-balanced

Targets run one after another on the same stream, so they never compete for
the machine; each is bounded by --queries and --max-duration-s. Each target is
asked for its models first (an unreachable or wrong URL stops the test with one
line), and a replay server that reports another pool than --traces gets a
one-line warning: its answers would not be graded on the stream's samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from clear_core.cli_args import (
    HelpFormatter, UsageError, add_list_argument, make_dir, parses_a_list, positive_float, positive_int, run_command,
    split_items,
)
from clear_core.traces import MIXTURES, load_pool, pool_fingerprint
from load_tests.driver import LoadConfig, ServerInfo, TargetError, normalize_base_url, probe, run_load
from load_tests.report import side_by_side, summarize, write_figures, write_run
from load_tests.traffic import plan_stream

PROG = "python -m load_tests"


@parses_a_list
def parse_targets(text: str) -> list[tuple[str, str]]:
    """``LABEL=URL[,LABEL=URL...]`` -> ``[(label, base URL)]``; a trailing ``/`` or ``/v1`` is dropped."""
    out = []
    for item in split_items(text):
        label, eq, url = item.partition("=")
        if not eq or not label or not url.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"expected LABEL=URL, got {item!r}")
        out.append((label, normalize_base_url(url)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    add_list_argument(p, "--target", kind=parse_targets, metavar="LABEL=URL", required=True, repeatable=True,
                      help="server base URLs (a trailing /v1 is dropped), repeatable")
    p.add_argument("--traces", required=True, help="oracle pool JSONL the stream is drawn from")
    p.add_argument("--stream", default="balanced", choices=sorted(MIXTURES), help="traffic mixture")
    p.add_argument("--queries", type=positive_int, default=500, help="requests per target (the stream size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and the arrivals")
    p.add_argument("--concurrency", type=positive_int, default=32, help="clients, or max in flight with --rate")
    p.add_argument("--rate", type=positive_float, default=None,
                   help="Poisson arrivals per second (open loop; default: closed loop of --concurrency clients)")
    p.add_argument("--max-duration-s", type=positive_float, default=600.0, help="no new request after this")
    p.add_argument("--request-timeout-s", type=positive_float, default=120.0, help="per request")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="client max_tokens sent with every request")
    p.add_argument("--model", default=None, help="model to ask for (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key of the servers")
    p.add_argument("--status-interval-s", type=float, default=1.0,
                   help="poll /v1/clear/status this often during the run (0: never)")
    p.add_argument("--no-replay-samples", action="store_true", help="don't name the recorded sample (real engines)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def check_target(label: str, url: str, api_key: str | None) -> ServerInfo:
    """Ask the server for its models before sending anything: an unreachable or wrong URL is one line."""

    async def ask() -> ServerInfo:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(headers=headers, timeout=30) as client:
            return await probe(client, url)

    try:
        return asyncio.run(ask())
    except TargetError as exc:
        raise UsageError(f"target {label}: {exc}") from None


def pool_mismatch(label: str, server: dict | None, traces: str, problems) -> str | None:
    """A one-line warning when the server replays another pool than the stream's, else None.

    A server that does not say what it replays (a real engine, another server) is not compared.
    """
    if not server or "fingerprint" not in server:
        return None
    ours = pool_fingerprint(problems)
    if server["fingerprint"] == ours:
        return None
    kind = "a synthetic workload" if server.get("synthetic") else "another pool"
    return (f"{PROG}: warning: target {label} replays {kind} ({server.get('problems')} problems, fingerprint "
            f"{server['fingerprint']}), not --traces {traces} ({len(problems)} problems, fingerprint {ours}): "
            "its answers are not graded on the samples the stream names")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line error (or the help)
        return int(exc.code or 0)
    return run_command(PROG, lambda: run(args))


def run(args) -> int:
    labels = [label for label, _ in args.target]
    if len(set(labels)) < len(labels):
        raise UsageError(f"argument --target: a label names two targets: {labels}")
    problems = load_pool(args.traces)
    plan = plan_stream(problems, args.stream, args.queries, args.seed)
    make_dir(args.out)
    servers = {label: check_target(label, url, args.api_key) for label, url in args.target}
    for label, info in servers.items():
        warning = None if args.no_replay_samples else pool_mismatch(label, info.replay, args.traces, problems)
        if warning:
            print(warning, file=sys.stderr)
    summaries, runs, statuses = {}, {}, {}
    for label, url in args.target:
        cfg = LoadConfig(
            base_url=url, model=args.model or servers[label].model, mode="rate" if args.rate else "concurrency",
            concurrency=args.concurrency, rate_rps=args.rate or 0.0, max_requests=args.queries,
            max_duration_s=args.max_duration_s, request_timeout_s=args.request_timeout_s,
            max_tokens=args.max_tokens, api_key=args.api_key, replay_samples=not args.no_replay_samples,
            seed=args.seed, status_interval_s=args.status_interval_s,
        )
        # disable=None: a bar on a terminal only, not a carriage-return line in a redirected log
        with tqdm(total=len(plan), desc=label, unit="req", disable=None) as bar:
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
