"""Where a policy served online loses to the uniform cap that fills the budget: per seed, per query.

The bench (``clear-llm bench --protocol online``) reports one gap per cell,
averaged over seeds. This takes a few cells apart: for each seed it serves the
stream through the same online market and ledger as the bench
(:func:`clear_bench.online.serve_online`, nothing in flight), prints the gap to
the best of the three uniform baselines, the generated tokens against
``b N``, and the queries that the budget-filling uniform cap solves and the
policy does not ("lost") or the other way round ("won"): their arrival index,
problem, calibration bin (within its fold), raw prediction, cap, true length and what
the market answered. Lost queries at the end of the stream, abandoned as
insolvent, are the block running dry; lost queries admitted with a cap just
short of their length are caps set too low by the bin's histogram. The same
problem can recur within a stream and across seeds (a stream samples the
pool's few hard problems again and again). Usage:

    python benchmarks/online_cells.py --predictions artifacts/predictions/oof-minilm.jsonl \\
        --cells mostly-easy:512,u-shaped:512 --seeds 0,1,2,3,4

(the out-of-fold file comes from ``clear-llm predictor crossval``, see docs/results/predictor.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clear_bench.online import serve_online, stream_inputs  # noqa: E402
from clear_bench.predictions import parse_predictions  # noqa: E402
from clear_core.calibration import DEFAULT_SHRINK  # noqa: E402
from clear_core.cli_args import HelpFormatter, UsageError, add_list_argument, run_command  # noqa: E402
from clear_core.policies import parse_policy  # noqa: E402
from clear_core.simulate import solved_mask, uniform_cap_within  # noqa: E402
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, load_pool, make_stream  # noqa: E402

DEFAULT_POOL = REPO_ROOT.parent / "shared" / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
N_QUERIES = 500  # the bench's stream length


def cell(text: str) -> tuple[str, int]:
    """``STREAM:BUDGET`` (tokens per query)."""
    name, sep, budget = text.rpartition(":")
    if not sep or not name or not budget.isdigit() or int(budget) < 1:
        raise UsageError(f"--cells: {text!r} is not STREAM:BUDGET (e.g. u-shaped:512)")
    return name, int(budget)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/online_cells.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--traces", default=str(DEFAULT_POOL), help="oracle pool JSONL")
    p.add_argument("--predictions", default="oracle-noise:0.5",
                   help="oracle-noise:SIGMA or a predictions JSONL (out of fold)")
    p.add_argument("--policy", default="clear-cost-emp", help="a policy the online market serves")
    add_list_argument(p, "--cells", kind=cell, what="STREAM:BUDGET pairs", default="mostly-easy:512,u-shaped:512",
                      help="cells to take apart")
    add_list_argument(p, "--seeds", kind=int, what="integers", default="0,1,2,3,4", help="stream seeds")
    p.add_argument("--shrink", type=float, default=DEFAULT_SHRINK, help="prior strength of the bins' histograms")
    p.add_argument("--queries", action="store_true", help="list the lost and won queries")
    return p


def run(args) -> int:
    problems = load_pool(args.traces)
    predictions = parse_predictions(args.predictions, calibration="binned", problems=problems, shrink=args.shrink)
    policy = parse_policy(args.policy)
    limit = POOL_GENERATION_CAP_TOKENS
    print(f"{policy.name} served online vs the best of the 3 uniform baselines ({args.predictions})")
    print("| stream | b | seed | accuracy | best uniform | gap | generated / bN | lost (problems) | won "
          "| lost in the last 10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    details = []
    for name, b in args.cells:
        gaps = []
        for seed in args.seeds:
            stream = make_stream(problems, name, N_QUERIES, seed)
            told = stream_inputs(predictions, stream)
            trace: list[dict] = []
            caps = serve_online(policy, told, stream.tokens, b, context_limit_tokens=limit, trace=trace)
            n = len(stream.tokens)
            solved = solved_mask(caps, stream.tokens, stream.correct)
            generated = int(np.minimum(caps, stream.tokens).sum())
            fill = solved_mask(np.full(n, uniform_cap_within(stream.tokens, b * n, limit)), stream.tokens,
                               stream.correct)
            matched = solved_mask(np.full(n, uniform_cap_within(stream.tokens, generated, limit)), stream.tokens,
                                  stream.correct)
            best = max(fill.mean(), matched.mean(), solved_mask(np.full(n, b), stream.tokens, stream.correct).mean())
            gap = 100 * (solved.mean() - best)
            gaps.append(gap)
            lost, won = np.flatnonzero(~solved & fill), np.flatnonzero(solved & ~fill)
            ids = list(stream.problem_ids)
            problems_lost = len({ids[i] for i in lost})
            print(f"| {name} | {b} | {seed} | {100 * solved.mean():.1f} | {100 * best:.1f} | {gap:+.1f} | "
                  f"{generated / (b * n):.3f} | {lost.size} ({problems_lost}) | {won.size} | "
                  f"{int((lost >= n - 10).sum())} |")
            bins = told.bins if told.bins is not None else np.zeros(n, dtype=np.int64)
            per_fold = max(len(told.histograms) // max(predictions.folds, 1), 1)
            row = (lambda i: f"#{i} {ids[i]} bin {bins[i] % per_fold} raw {told.raw[i]:.0f} cap {caps[i]} "
                   f"length {stream.tokens[i]} {trace[i]['reason']}")
            details.append((f"{name} {b} seed {seed}", [row(i) for i in lost], [row(i) for i in won]))
        print(f"| {name} | {b} | mean | | | **{np.mean(gaps):+.2f}** | | | | |")
    if args.queries:
        for title, lost, won in details:
            print(f"\n{title}\n  lost: " + "; ".join(lost) + "\n  won: " + "; ".join(won))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("python benchmarks/online_cells.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
