"""``clear-llm bench``: the paper's experiments on a trace pool."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from clear_core.cli_args import (
    HelpFormatter, UsageError, add_list_argument, make_dir, non_negative_float, non_negative_int, parses_a_list,
    positive_int, split_items,
)
from clear_core.calibration import DEFAULT_SHRINK
from clear_core.empirical_market import SMOOTHING_LOG
from clear_core.exploration import DEFAULT_EXPLORE_SHARE, DEFAULT_EXPLORE_TOKEN_SHARE, Exploration
from clear_core.errors import InvalidInputError
from clear_core.policies import POLICIES, parse_policy_list
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, STREAM_FAMILIES, load_pool, pool_streams

DEFAULT_BUDGETS = "256,512,1024,2048,4096"
DEFAULT_POLICIES = ",".join(
    ["uniform", "uniform-generated", "proportional", "tale-ep", "heuristic", "auction", "clear", "clear-cost", "clear-cost-emp",
     "clear-paper",
     "clear-optimal",
     "clear-triangular", "clear-quadratic", "oracle"]
)


@parses_a_list
def policy_list(text: str) -> list[str]:
    """An argparse ``type``: policy specs in the one list syntax; a key=value item continues the spec before it."""
    try:
        return parse_policy_list(",".join(split_items(text)))
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="evaluate allocation policies offline on a trace pool",
                              description="Evaluate allocation policies offline on a trace pool (the paper's "
                              "experiments): results.json, results.md and figures in --out.",
                              formatter_class=HelpFormatter)
    p.add_argument("--traces", required=True, help="oracle pool JSONL (see shared/data/traces/README.md)")
    p.add_argument("--predictions", default="oracle-noise:0.5",
                   help="oracle | oracle-noise:SIGMA | head (the shipped ridge head, priced as serving prices it) | "
                   "head:PATH (a head file) | predictions JSONL {id, threshold_tokens[, log_sigma]} (a file named "
                   "head: ./head)")
    p.add_argument("--log-sigma", type=float, default=None,
                   help="override the predictions' one log-space error (that clear prices)")
    p.add_argument("--calibration", default=None, choices=["binned", "global", "none"],
                   help="the length distribution that clear-cost prices: binned (median, spread and runaway share "
                   "calibrated out of fold per bin of predicted length), global (one of each, out of fold) or "
                   "none (raw thresholds, one spread); the paper's policies always take raw thresholds "
                   "(default: binned, none for oracle, the head's own calibration for head predictions, which "
                   "take binned only: then for every servable policy, the full-truth reference)")
    add_list_argument(p, "--streams", metavar="STREAM", what="stream names",
                      help="streams of the pool's family (default: all of them): "
                      + "; ".join(f"{f.name}: {','.join(f.streams)}" for f in STREAM_FAMILIES.values()))
    p.add_argument("--protocol", default=None, choices=["single", "best-of-k", "sequential", "online"],
                   help="single: one sample per query; best-of-k: k trajectories in parallel, each capped at "
                   "budget/k; sequential: k trajectories one after another, each capped by what is left; online: "
                   "one sample per query, each priced on arrival by the allocator's online market and settled "
                   "with what it generated (clear_bench.online) (default: single, online with --warmup-queries)")
    p.add_argument("--warmup-queries", type=non_negative_int, default=0,
                   help="online: serve this many arrivals, drawn with the stream's mix from one half of the pool "
                   "(split by a seeded hash of the problem ids), before the scored stream, drawn from the other "
                   "half, in the same run (ledger and pricing window carry over); not scored")
    p.add_argument("--learn", action="store_true",
                   help="with --warmup-queries and head predictions: the length model learns from the warm-up's "
                   "settled queries as the service does (censored at their caps; nothing from an abandoned one) "
                   "and is frozen for the scored stream")
    p.add_argument("--refit-every", type=positive_int, default=50,
                   help="--learn: settled queries between refits (default %(default)s)")
    p.add_argument("--prior-weight", type=non_negative_float, default=30.0,
                   help="--learn: observations each of the head's calibration bins is worth (default %(default)s)")
    p.add_argument("--explore-share", type=non_negative_float, default=DEFAULT_EXPLORE_SHARE,
                   help="--learn: chance that a warm-up arrival the market would abandon as insolvent is served at a "
                   "probe cap instead (clear_core.exploration) (default %(default)s; 0: off)")
    p.add_argument("--explore-token-share", type=non_negative_float, default=DEFAULT_EXPLORE_TOKEN_SHARE,
                   help="--learn: most share of the allocated tokens the probes may hold (default %(default)s)")
    p.add_argument("--features-cache", type=Path, default=None,
                   help="head predictions: where the pool's encoder features are cached (default "
                   "~/.cache/clear-llm/features)")
    p.add_argument("--in-flight", type=non_negative_int, default=0,
                   help="--protocol online: a query settles this many arrivals after its own")
    p.add_argument("--shrink", type=non_negative_float, default=DEFAULT_SHRINK,
                   help="strength (pseudo-samples) of the prior each calibration bin's length histogram is shrunk "
                   "towards: every calibration length, as if predicted at the bin's centre (clear-cost-emp)")
    p.add_argument("--smoothing", type=non_negative_float, default=SMOOTHING_LOG,
                   help="width, in ln length, of the Gaussian kernel that smooths each calibration bin's length "
                   "histogram (clear-cost-emp)")
    p.add_argument("--k", type=positive_int, default=5, help="trajectories per query with --protocol best-of-k | "
                   "sequential; --budgets are then totals per query")
    add_list_argument(p, "--budgets", kind=positive_int, what="positive token counts", metavar="TOKENS",
                      default=DEFAULT_BUDGETS, help="tokens per query")
    add_list_argument(p, "--policies", kind=policy_list, metavar="SPEC",
                      help="policy specs (default: every policy); a spec's own parameters follow it, "
                      f"e.g. uniform,clear-paper:beta=0.01,alpha=4,clear; names: {sorted(POLICIES)}")
    add_list_argument(p, "--seeds", kind=int, what="integers", metavar="SEED", default="0,1,2,3,4",
                      help="seeds of the streams and of the prediction noise")
    p.add_argument("--queries", type=positive_int, default=500, help="queries per stream")
    p.add_argument("--context-limit-tokens", type=positive_int, default=POOL_GENERATION_CAP_TOKENS,
                   help="no cap exceeds this (default: the pools' generation cap, %(default)s)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--dump-allocations", action="store_true", help="write allocations.jsonl (one row per query)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures and sensitivity studies")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from clear_bench.predictions import parse_predictions
    from clear_bench.report import markdown_report
    from clear_bench.runner import WarmUp, run_grid

    if args.protocol is None:
        args.protocol = "online" if args.warmup_queries else "single"
    if args.warmup_queries and args.protocol != "online":
        raise UsageError("argument --warmup-queries: a warm-up is served online (--protocol online)")
    if args.learn and not args.warmup_queries:
        raise UsageError("argument --learn: needs --warmup-queries N (the stream it learns from)")
    is_head = args.predictions == "head" or args.predictions.startswith("head:")
    if args.learn and not is_head:
        raise UsageError("argument --learn: needs --predictions head or head:PATH (the head learns from encoder "
                         "features)")
    if args.learn and args.prior_weight <= 0:
        raise UsageError("argument --prior-weight: must be > 0")
    if args.policies is None:  # uniform-generated is a single-sample baseline
        args.policies = [p for p in policy_list(DEFAULT_POLICIES)
                         if args.protocol in ("single", "online") or p != "uniform-generated"]
    if args.protocol not in ("single", "online") and "uniform-generated" in args.policies:
        raise UsageError("uniform-generated needs one length per query: use it with --protocol single or online")
    problems = load_pool(args.traces)
    known = pool_streams(problems)
    args.streams = args.streams or known
    unknown = [s for s in args.streams if s not in known]
    if unknown:
        raise UsageError(f"argument --streams: unknown stream {unknown[0]!r} for this pool; expected one of {known}")
    predictions = parse_predictions(args.predictions, args.log_sigma, calibration=args.calibration, problems=problems,
                                    shrink=args.shrink, smoothing=args.smoothing, pool_path=args.traces,
                                    features_cache=args.features_cache)
    make_dir(args.out)

    dump = (args.out / "allocations.jsonl").open("w") if args.dump_allocations else None

    trials = args.protocol not in ("single", "online")

    def on_allocation(cell, stream, caps):
        if dump is None:
            return
        # best-of-k: the cap is the query's total; its trajectories are the problem's first k samples
        where = {"protocol": args.protocol, "k": args.k} if trials else {"protocol": args.protocol}
        for pid, j, cap in zip(stream.problem_ids, stream.sample_index.tolist(), caps.tolist()):
            row = {"stream": cell.stream, "seed": cell.seed, "budget_per_query": cell.budget_per_query,
                   "policy": cell.policy, "problem_id": pid, **where, "cap": cap}
            if not trials:
                row["sample_index"] = j
            dump.write(json.dumps(row) + "\n")

    total = len(args.streams) * len(args.seeds) * len(args.budgets) * len(args.policies)
    # disable=None: a bar on a terminal only, never a 50 KB line of carriage returns in a log file
    with tqdm(total=total, desc="bench", unit="cell", disable=None) as bar:
        rows = run_grid(problems, predictions, streams=args.streams, budgets=args.budgets, policies=args.policies,
                        seeds=args.seeds, n_queries=args.queries, context_limit_tokens=args.context_limit_tokens,
                        on_allocation=on_allocation, progress=bar.update, protocol=args.protocol,
                        in_flight=args.in_flight,
                        k=args.k if trials else 1,
                        warmup=WarmUp(args.warmup_queries, args.learn, args.refit_every, args.prior_weight,
                                      _exploration(args)))
    if dump is not None:
        dump.close()
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    title = f"CLEAR bench on {Path(args.traces).name}" + (f", {args.protocol} with k = {args.k}" if trials else "")
    if args.protocol == "online":
        title += f", online (each query priced on arrival, {args.in_flight} in flight)"
    if args.warmup_queries:
        title += (f", after {args.warmup_queries} warm-up arrivals"
                  + (" the length model learned from" if args.learn else " (nothing learned)"))
    report = markdown_report(rows, title=title)
    (args.out / "results.md").write_text(report)
    print(report)
    if args.protocol != "single" and not args.no_figures:
        from clear_bench import plots

        plots.phase_transition(rows, args.out)  # the sensitivity studies are single-sample experiments
        if args.protocol == "online":
            _online_figure(args, problems, predictions)
    elif not args.no_figures:
        _figures(args, problems, predictions, rows)
    print(f"wrote {args.out}/results.json, results.md" + ("" if args.no_figures else " and figures"))
    return 0


def _exploration(args) -> Exploration | None:
    try:
        return Exploration(args.explore_share, args.explore_token_share) if args.learn else None
    except InvalidInputError as exc:
        raise UsageError(f"argument --explore-share / --explore-token-share: {exc}") from None


def _online_figure(args, problems, predictions) -> None:
    """online_pacing.png: the first stream, the middle budget, the first policy that refunds (else the first)."""
    from clear_bench.online import HINDSIGHT, stream_inputs
    from clear_bench.online_plot import online_pacing
    from clear_core.policies import parse_policy
    from clear_core.traces import make_stream

    specs = [p for p in args.policies if parse_policy(p).name not in HINDSIGHT]
    if not specs:
        return
    spec = next((p for p in specs if parse_policy(p).charges_generated_tokens), specs[0])
    stream_name = "balanced" if "balanced" in args.streams else args.streams[0]
    budget = sorted(args.budgets)[len(args.budgets) // 2]
    stream = make_stream(problems, stream_name, args.queries, args.seeds[0])
    inputs = stream_inputs(predictions, stream)
    online_pacing(parse_policy(spec), inputs, stream.tokens, int(budget), args.out,
                  context_limit_tokens=args.context_limit_tokens, in_flight=args.in_flight,
                  title=f"{spec} served online: {stream_name}, {budget} tokens per query, seed {args.seeds[0]}, "
                  f"{predictions.spec}")


def _figures(args, problems, predictions, rows) -> None:
    from clear_bench import plots, studies

    stream = "balanced" if "balanced" in args.streams else args.streams[0]
    mid = sorted(args.budgets)[len(args.budgets) // 2]
    plots.phase_transition(rows, args.out)
    coverage = None
    if predictions.spec != "oracle" and "clear-cost" in args.policies:
        from clear_bench.calibration_plot import coverage_study

        coverage = coverage_study(problems, predictions, args.out, streams=args.streams, budgets=args.budgets,
                                  seeds=args.seeds, n_queries=args.queries, context_limit_tokens=args.context_limit_tokens)
        cal, raw = coverage["calibrated"], coverage["global"]
        print(f"calibration (mean quantile-coverage error / ECE of clear-cost's caps): calibrated "
              f"{cal['quantile_error']:.3f} / {cal['cap_ece']:.3f}, raw with one spread "
              f"{raw['quantile_error']:.3f} / {raw['cap_ece']:.3f} (calibration.png)")
    studies.scatter(problems, predictions, args.out, stream=stream, budget=sorted(args.budgets)[1 if len(args.budgets) > 1 else 0],
                    seed=args.seeds[0], context_limit_tokens=args.context_limit_tokens)
    n_noise = len(studies.NOISE_SIGMAS) * len(args.seeds) * 2 * 3
    n_beta = len(args.seeds) * len(args.budgets) * (len(studies.FIXED_BETAS) + 1)
    n_alpha = len(studies.ALPHAS) * len(args.seeds) * len(args.budgets)
    with tqdm(total=n_noise + n_beta + n_alpha, desc="figures", unit="cell", disable=None) as bar:
        kw = dict(stream=stream, seeds=args.seeds, context_limit_tokens=args.context_limit_tokens, tick=bar.update)
        noise = studies.noise_study(problems, args.out, budgets=[sorted(args.budgets)[0], mid], **kw)
        beta = studies.beta_study(problems, predictions, args.out, budgets=args.budgets, **kw)
        alpha = studies.alpha_study(problems, predictions, args.out, budgets=args.budgets, **kw)
    (args.out / "studies.json").write_text(json.dumps({"noise": noise, "beta": beta, "alpha": alpha,
                                                       "coverage": coverage}, indent=1))
