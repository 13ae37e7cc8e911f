"""Load demo: uniform vs clear on the embedded default's graph with a budget of caps, side by side, over HTTP.

    python benchmarks/load_demo.py --traces POOL.jsonl [--tokenizer qwen.tiktoken] [--port 8000] --out DIR

(``make load-demo``.) Starts a local Ray (CPU), deploys the graph of
``serve_config.yaml`` twice (policy ``uniform`` and policy ``clear``, each with
its own budget and route prefix; the learner off, so both price with the shipped
head), on a per-query budget of caps (the
paper's setting: a cap is charged whole; the embedded default itself charges
the tokens generated) with the replay engine pointed at a trace pool
so answers follow trace semantics, and drives each with the same stream (closed
loop, N clients). Each (stream, policy) pair gets a fresh deployment, so every
run starts from an empty budget and pricing window. Writes ``summary.md``,
``summary.json``, per-request records, the polls of ``/v1/clear/status`` and the
over-time figures to ``--out`` (``python -m load_tests.report --results DIR/uniform-balanced.records.jsonl
DIR/clear-balanced.records.jsonl --out DIR`` redraws them from the files).

The deployment lives here, beside the other benchmarks that start the service;
the requests go through the ``load_tests`` driver, which only speaks HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_bench.cli import policy_list  # noqa: E402
from clear_core.cli_args import (  # noqa: E402
    HelpFormatter, UsageError, add_list_argument, make_dir, positive_float, positive_int, run_command,
)
from clear_core.traces import load_pool  # noqa: E402
from load_tests.driver import LoadConfig, run_load  # noqa: E402
from load_tests.report import plot_allocator_over_time, plot_over_time, side_by_side, summarize, write_run  # noqa: E402
from load_tests.traffic import plan_stream  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def default_args() -> dict:
    """The embedded default's builder args (serve_config.yaml's only application)."""
    cfg = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    return cfg["applications"][0]["args"]


def app_args(policy: str, budget: int, traces: str, tokenizer: str | None, queries: int,
             predictor: str | None = None) -> dict:
    args = copy.deepcopy(default_args())
    if predictor is not None:  # another backend than the embedded default's (e.g. heuristic: prompt length)
        args["predictor"] = {"backend": predictor}
    args["allocator"]["policy"] = policy
    # Fresh books for every run: the embedded default names its budget (clear-default, kept in a file),
    # and the runs of this demo must not continue each other's (or a previous `serve run`'s) books.
    args["allocator"].pop("budget_name", None)
    args["allocator"]["budget"].update({"mode": "per_query", "tokens_per_query": budget, "window_queries": queries,
                                        "refund_unused": False})  # a budget of caps, where clear is the market
    args["learner"] = {"enabled": False}  # each run starts from the shipped head (learning: benchmarks/learning_live.py)
    args["engine"]["trace_path"] = traces
    args["engine"]["tokenizer_path"] = tokenizer
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/load_demo.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--traces", required=True, help="trace pool the engine replays and the stream is drawn from")
    p.add_argument("--tokenizer", default=None, help="qwen.tiktoken for exact token cuts")
    add_list_argument(p, "--streams", metavar="STREAM", default="balanced,u-shaped", help="streams, one after another")
    add_list_argument(p, "--policies", kind=policy_list, metavar="SPEC", default="uniform,clear",
                      help="one deployment per policy")
    p.add_argument("--budget", type=positive_int, default=256, help="tokens per query (256 is scarce)")
    p.add_argument("--queries", type=positive_int, default=500, help="requests per stream and policy")
    p.add_argument("--concurrency", type=positive_int, default=32, help="concurrent clients")
    p.add_argument("--seed", type=int, default=0, help="seed of the streams")
    p.add_argument("--max-duration-s", type=positive_float, default=600.0, help="per run")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the local Serve proxy (0: a free one)")
    p.add_argument("--predictor", default=None, choices=["minilm-ridge", "heuristic"],
                   help="predictor backend (default: the embedded default's, serve_config.yaml)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)  # a bad value: argparse's one-line error, exit 2
    return run_command(parser.prog, lambda: run(a))


def run(a) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app

    pool = load_pool(a.traces)
    plans = {stream: plan_stream(pool, stream, a.queries, a.seed) for stream in a.streams}  # bad names fail here
    make_dir(a.out)
    port = a.port or _free_port()
    if not _port_free(port):
        raise UsageError(f"argument --port: 127.0.0.1:{port} is in use; pick another (make load-demo PORT=...)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    report, all_summaries = [], {}
    try:
        for stream in a.streams:
            plan = plans[stream]
            summaries, runs, statuses = {}, {}, {}
            for policy in a.policies:
                name = f"{policy}-{stream}"
                serve.run(build_app(app_args(policy, a.budget, a.traces, a.tokenizer, a.queries, a.predictor)), name=name,
                          route_prefix=f"/{name}")
                cfg = LoadConfig(base_url=f"http://127.0.0.1:{port}/{name}", concurrency=a.concurrency,
                                 max_requests=a.queries, max_duration_s=a.max_duration_s, seed=a.seed)
                with tqdm(total=len(plan), desc=name, unit="req", disable=None) as bar:  # a bar on a terminal only
                    t0 = time.perf_counter()
                    status: list[dict] = []
                    records = asyncio.run(run_load(cfg, plan, progress=lambda _r: bar.update(1),
                                                   status_samples=status))
                    wall = time.perf_counter() - t0
                serve.delete(name)
                runs[policy], statuses[policy] = records, status
                summaries[policy] = summarize(records, wall)
                write_run(a.out, name, records, status)
            plot_over_time(runs, a.out / f"over_time_{stream}.png")
            plot_allocator_over_time(runs, statuses, a.out / f"allocator_over_time_{stream}.png")
            section = (f"## `{stream}` stream, {a.budget} tokens per query, {a.queries} requests, "
                       f"{a.concurrency} concurrent clients\n\n" + side_by_side(summaries))
            report.append(section)
            all_summaries[stream] = summaries
            print(section, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    backend = a.predictor or default_args()["predictor"]["backend"]
    head = (f"# Load test on the embedded default (serve_config.yaml: CPU, replay engine, {backend} predictor), "
            f"replaying `{Path(a.traces).name}`\n\n")
    (a.out / "summary.md").write_text(head + "\n\n".join(report) + "\n")
    (a.out / "summary.json").write_text(json.dumps(all_summaries, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
