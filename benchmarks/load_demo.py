"""Load demo: uniform vs clear on the embedded default, side by side, over HTTP.

    python benchmarks/load_demo.py --traces POOL.jsonl [--tokenizer qwen.tiktoken] --out DIR

(``make load-demo``.) Starts a local Ray (CPU), deploys the graph of
``serve_config.yaml`` twice (policy ``uniform`` and policy ``clear``, each with
its own budget and route prefix) with the replay engine pointed at a trace pool
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
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_core.traces import load_pool  # noqa: E402
from load_tests.driver import LoadConfig, run_load  # noqa: E402
from load_tests.report import plot_allocator_over_time, plot_over_time, side_by_side, summarize, write_run  # noqa: E402
from load_tests.traffic import plan_stream  # noqa: E402


def default_args() -> dict:
    """The embedded default's builder args (serve_config.yaml's only application)."""
    cfg = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    return cfg["applications"][0]["args"]


def app_args(policy: str, budget: int, traces: str, tokenizer: str | None, queries: int) -> dict:
    args = copy.deepcopy(default_args())
    args["allocator"]["policy"] = policy
    args["allocator"]["budget"].update({"mode": "per_query", "tokens_per_query": budget, "window_queries": queries})
    args["engine"]["trace_path"] = traces
    args["engine"]["tokenizer_path"] = tokenizer
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/load_demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--traces", required=True)
    p.add_argument("--tokenizer", default=None, help="qwen.tiktoken for exact token cuts")
    p.add_argument("--streams", default="balanced,u-shaped")
    p.add_argument("--policies", default="uniform,clear")
    p.add_argument("--budget", type=int, default=256, help="tokens per query (scarce: 256)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import ray
    from ray import serve

    from deployments.app import build_app

    pool = load_pool(a.traces)
    a.out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    report, all_summaries = [], {}
    try:
        for stream in a.streams.split(","):
            plan = plan_stream(pool, stream, a.queries, a.seed)
            summaries, runs, statuses = {}, {}, {}
            for policy in a.policies.split(","):
                name = f"{policy}-{stream}"
                serve.run(build_app(app_args(policy, a.budget, a.traces, a.tokenizer, a.queries)), name=name,
                          route_prefix=f"/{name}")
                cfg = LoadConfig(base_url=f"http://127.0.0.1:8000/{name}", concurrency=a.concurrency,
                                 max_requests=a.queries, max_duration_s=a.max_duration_s, seed=a.seed)
                with tqdm(total=len(plan), desc=name, unit="req") as bar:
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
    head = ("# Load test on the embedded default (serve_config.yaml: CPU, replay engine, prompt-length predictor), "
            f"replaying `{Path(a.traces).name}`\n\n")
    (a.out / "summary.md").write_text(head + "\n\n".join(report) + "\n")
    (a.out / "summary.json").write_text(json.dumps(all_summaries, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
