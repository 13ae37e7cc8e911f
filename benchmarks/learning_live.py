"""The live service learning a pool its head was never fitted on: the replay twin serving the code pool.

    python benchmarks/learning_live.py --out artifacts/learning/live

Starts a local Ray (CPU) and deploys the embedded default's graph (serve_config.yaml: the shipped
minilm-ridge head, ``policy: auto`` on a refunding budget, the learner on) twice, with the replay engine
replaying the code pool: once as it is, and once with ``policy: uniform`` and no learner. Both are driven
over HTTP (the ``load_tests`` driver) with the same stream of ``--queries`` requests. The learner refits
every ``--refit-every`` observations and publishes what passes its held-out check; the predictor and the
markets take each version up within ``poll_s``. Reported: accuracy (percent solved) of the first and the
last third of the stream for both, the versions published during the run (from the status polls), and
the learner's status at the end. Writes ``summary.md``, ``summary.json`` and the records to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clear_core.cli_args import HelpFormatter, make_dir, positive_int, run_command  # noqa: E402
from clear_core.traces import load_pool  # noqa: E402
from load_tests.driver import LoadConfig, run_load  # noqa: E402
from load_tests.report import write_run  # noqa: E402
from load_tests.traffic import plan_stream  # noqa: E402

CODE_POOL = REPO.parent / "shared" / "data" / "traces" / "qwen2.5-coder-1.5b-code.jsonl"
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/learning_live.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--traces", type=Path, default=CODE_POOL, help="the pool replayed (default: the code pool)")
    p.add_argument("--stream", default="balanced", help="stream of the pool's family (default %(default)s)")
    p.add_argument("--budget", type=positive_int, default=256, help="tokens per query (default %(default)s)")
    p.add_argument("--queries", type=positive_int, default=1500, help="requests (default %(default)s)")
    p.add_argument("--concurrency", type=positive_int, default=8, help="concurrent clients (default %(default)s)")
    p.add_argument("--refit-every", type=positive_int, default=100,
                   help="learner.advanced.refit_every and min_observations (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream (default %(default)s)")
    p.add_argument("--engine", default="replay", choices=["replay", "vllm"],
                   help="replay: the replay engine; vllm: real vLLM on CPU (through Ray Serve LLM) generating the "
                   "recorded lengths with the model of --model (default %(default)s)")
    p.add_argument("--model", default=None, help="--engine vllm: a model directory of `clear-llm engine make-model`")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    return run_command(parser.prog, lambda: run(a))


def app_args(a, policy: str, learn_dir: str | None) -> dict:
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = copy.deepcopy(cfg["applications"][0]["args"])
    args["allocator"]["policy"] = policy
    args["allocator"].pop("budget_name", None)
    args["allocator"]["budget"].update({"tokens_per_query": a.budget, "window_queries": a.queries})
    if a.engine == "vllm":
        from benchmarks.digital_twin import MODEL_NAMES, engine_args

        args["model_name"] = MODEL_NAMES["vllm"]
        args["engine"] = engine_args("vllm", a.traces, a.model)
    else:
        args["engine"]["trace_path"] = str(a.traces)
        args["engine"]["tokenizer_path"] = str(TOKENIZER) if TOKENIZER.is_file() else None
    if learn_dir is None:
        args["learner"] = {"enabled": False}
    else:
        args["learner"] = {"advanced": {"refit_every": a.refit_every, "min_observations": a.refit_every,
                                        "refit_interval_s": 10.0, "poll_s": 1.0, "log_url": learn_dir}}
    return args


def thirds(records) -> list[float]:
    records = sorted(records, key=lambda r: r.index)
    k = len(records) // 3
    parts = [records[:k], records[k:2 * k], records[2 * k:]]
    return [100.0 * sum(r.solved for r in p) / max(len(p), 1) for p in parts]


def run(a) -> int:
    if a.engine == "vllm" and not a.model:
        from clear_core.cli_args import UsageError

        raise UsageError("argument --model: --engine vllm needs a model directory (clear-llm engine make-model)")
    import ray
    from ray import serve

    from deployments.app import build_app

    plan = plan_stream(load_pool(a.traces), a.stream, a.queries, a.seed)
    make_dir(a.out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    result = {"engine": a.engine, "pool": a.traces.name, "stream": a.stream, "budget_per_query": a.budget, "queries": a.queries,
              "concurrency": a.concurrency, "refit_every": a.refit_every}
    try:
        with tempfile.TemporaryDirectory() as learn_dir:
            for name, policy, learn in (("learning", "auto", learn_dir), ("uniform", "uniform", None)):
                serve.run(build_app(app_args(a, policy, learn)), name=name, route_prefix=f"/{name}")
                cfg = LoadConfig(base_url=f"http://127.0.0.1:{port}/{name}", concurrency=a.concurrency,
                                 max_requests=a.queries, max_duration_s=3600.0, seed=a.seed, status_interval_s=2.0)
                status: list[dict] = []
                t0 = time.perf_counter()
                records = asyncio.run(run_load(cfg, plan, status_samples=status))
                wall = time.perf_counter() - t0
                write_run(a.out, name, records, status)
                row = {"policy": None, "wall_s": wall, "thirds": thirds(records),
                       "accuracy": 100.0 * sum(r.solved for r in records) / len(records),
                       "abandoned": sum(r.status == "abandoned" for r in records)}
                last = status[-1] if status else {}
                row["policy"] = last.get("policy")
                if learn:
                    versions = []
                    for s in status:
                        v = (s.get("learner") or {}).get("model_version")
                        if v is not None and (not versions or versions[-1][1] != v):
                            versions.append((round(float(s.get("t_s", 0.0)), 1), v))
                    row["versions_published"] = versions
                    row["learner"] = last.get("learner")
                result[name] = row
                serve.delete(name)
                print(f"{name}: {json.dumps(row)[:600]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    lrn, uni = result["learning"], result["uniform"]
    md = [f"# The live service ({a.engine} engine) learning `{a.traces.name}` ({a.stream}, {a.budget} tokens per query, "
          f"{a.queries} requests, {a.concurrency} clients)", "",
          "| | first third | middle third | last third | all |", "|---|---|---|---|---|",
          f"| `{lrn['policy']}`, learning | " + " | ".join(f"{x:.1f}" for x in lrn["thirds"]) + f" | {lrn['accuracy']:.1f} |",
          "| `uniform` | " + " | ".join(f"{x:.1f}" for x in uni["thirds"]) + f" | {uni['accuracy']:.1f} |", "",
          f"Versions published (seconds into the run, version): {lrn['versions_published']}"]
    (a.out / "summary.md").write_text("\n".join(md) + "\n")
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))
    print("\n".join(md))
    print(json.dumps({k: v for k, v in result.items() if k not in ("learning", "uniform")}
                     | {"learning_thirds": lrn["thirds"], "uniform_thirds": uni["thirds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
