"""What the length learner costs: the traffic log's size per million requests, and one refit's time and memory
with 10^4 and 10^6 requests logged.

For each size N: N records of the shipped head's width (384 encoder features, float16 in the record) are
written to a traffic log in segments of ``--segment-records`` (as the learner writes them), then a fresh
:class:`deployments.learner.LengthLearner` resumes from the log (reads the newest ``window_observations``
records back) and refits once (the held-out validation included), on one BLAS thread as the learner does.
The lengths are synthetic (a linear model of the features plus noise, a third of them capped): the cost
does not depend on what they are. Prints one line per size and, last, one JSON object.

    python benchmarks/learner_cost.py                     # 10^4 and 10^6 records, window 20,000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clear_core.cli_args import HelpFormatter, list_of, positive_int, run_command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/learner_cost.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--sizes", type=list_of(positive_int, "record counts"), default=[10_000, 1_000_000],
                    help="records logged (default 10000,1000000)")
    ap.add_argument("--window", type=positive_int, default=20_000,
                    help="learner.advanced.window_observations (default %(default)s)")
    ap.add_argument("--segment-records", type=positive_int, default=1000, help="records per segment (default %(default)s)")
    ap.add_argument("--dir", type=Path, default=None, help="where the logs are written (default: a temporary directory)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _records(n: int, coef: np.ndarray, intercept: float, rng, chunk: int = 10_000):
    """``n`` synthetic records, made ``chunk`` at a time (the process holds one chunk's features)."""
    from deployments.traffic_log import TrafficRecord, encode_features

    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        x = rng.normal(0.0, 0.08, size=(m, coef.size)).astype(np.float32)
        length = np.maximum(np.exp(x @ coef + intercept - 0.8 + rng.normal(0, 0.7, m)), 1).round()
        caps = np.exp(x @ coef + intercept - 0.8 + rng.normal(0.3, 0.5, m)).round().astype(int) + 1
        for k in range(m):
            i, done = lo + k, length[k] <= caps[k]
            yield TrafficRecord(
                time=1.8e9 + i, request_id=f"chatcmpl-{i:032x}", tenant="default", model="clear-replay",
                prompt_sha256=hashlib.sha256(b"prompt %d" % i).hexdigest(), prediction_source="minilm-ridge", predicted_threshold_tokens=412.5,
                raw_threshold_tokens=388.1, log_sigma=0.61, runaway=0.0, cap_tokens=int(caps[k]),
                tokens=int(min(length[k], caps[k])), ended="natural" if done else "cap",
                features=encode_features(x[k]), model_version=3)


def _run(args) -> int:
    from threadpoolctl import threadpool_limits

    from clear_predictor.head import load_head
    from deployments.config import LearnerAdvanced
    from deployments.learner import LengthLearner
    from deployments.traffic_log import TrafficLog

    head = load_head()
    prior = head.length_model()
    adv = LearnerAdvanced(window_observations=args.window, log_segment_records=args.segment_records,
                          log_max_segments=max(args.sizes) // args.segment_records + 1)
    out = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.sizes:
            url = f"{tmp}/n{n}"
            log = TrafficLog(f"{url}/traffic", segment_records=args.segment_records,
                             max_segments=adv.log_max_segments)
            t0 = time.perf_counter()
            for record in _records(n, prior.coef, prior.intercept, np.random.default_rng(0)):
                log.append(record)
            log.flush()
            write_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(f"{url}/traffic").glob("*.jsonl"))
            learner = LengthLearner(prior, head.learning_alpha, adv, TrafficLog(f"{url}/traffic"))
            tracemalloc.start()
            t0 = time.perf_counter()
            resumed = learner.resume()
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with threadpool_limits(1):
                report = learner.refit()
            refit_s = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            row = {"records": n, "log_bytes": size, "bytes_per_record": size / n, "gb_per_million": size / n * 1e6 / 1e9,
                   "write_s": write_s, "resume_read_s": read_s, "window": resumed, "refit_s": refit_s,
                   "refit_outcome": report.outcome, "peak_python_mb": peak / 2 ** 20,
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            out.append(row)
            print(f"{n:>9,} records: log {size / 2 ** 20:,.1f} MiB ({size / n:,.0f} B per record, "
                  f"{row['gb_per_million']:.2f} GB per million); resume read {read_s:.2f} s ({resumed:,} records); "
                  f"refit {refit_s:.2f} s ({report.outcome}); memory allocated at the peak of resume and refit "
                  f"{row['peak_python_mb']:.0f} MiB (tracemalloc, numpy included), process max RSS "
                  f"{row['max_rss_mb']:.0f} MiB", flush=True)
    print(json.dumps({"window": args.window, "segment_records": args.segment_records, "sizes": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
