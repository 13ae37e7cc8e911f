"""Does CLEAR learn the traffic it serves? The shipped length model against the same model refitted online
from its own censored observations, on a pool it was never fitted on, against uniform caps.

For each stream, budget and seed: a warm-up stream (seed + 100) is served first, then the evaluation
stream (seed); each in its own budget block (``clear_bench.learning.serve_learning``). Three ways to serve:

* ``uniform``: the market's uniform cap ``b``;
* ``<policy>``: the shipped head and calibration throughout (what the deployment serves today);
* ``<policy>+learn``: the same model refitted every ``--refit-every`` settled queries from what they showed
  (features, cap, tokens, ended by itself or at the cap), carried from the warm-up into the evaluation.

Reported: accuracy on the evaluation stream (percent solved: cap >= recorded length and correct), per cell
and the number of cells each beats uniform in. The last line is one JSON object.

    python benchmarks/learn_from_traffic.py            # the code pool, 3 streams x 128/256/512 x seeds 0-2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clear_core.cli_args import HelpFormatter, list_of, positive_int, run_command  # noqa: E402

CODE_POOL = REPO.parent / "shared" / "data" / "traces" / "qwen2.5-coder-1.5b-code.jsonl"


def pool_features(problems, cache: Path) -> dict[str, np.ndarray]:
    """Each problem's encoder features (the shipped head's encoder), cached in ``cache`` (.npz)."""
    ids = [p.id for p in problems]
    if cache.is_file():
        got = np.load(cache, allow_pickle=False)
        if list(got["ids"]) == ids:
            return dict(zip(ids, got["features"]))
    from clear_predictor.features import FrozenEncoder
    from clear_predictor.head import load_head

    encoder = FrozenEncoder(max_length=load_head().max_length)
    t0 = time.perf_counter()
    feats = encoder.encode([p.problem for p in problems])
    print(f"encoded {len(ids)} prompts in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=np.array(ids), features=feats)
    return dict(zip(ids, feats))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/learn_from_traffic.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--traces", type=Path, default=CODE_POOL, help="the pool (default: the code pool)")
    ap.add_argument("--streams", default="balanced,mostly-easy,mostly-hard", help="streams (default %(default)s)")
    ap.add_argument("--budgets", type=list_of(positive_int, "token budgets"), default=[128, 256, 512], help="tokens per query (default 128,256,512)")
    ap.add_argument("--seeds", type=list_of(int, "seeds"), default=[0, 1, 2], help="evaluation seeds (default 0,1,2)")
    ap.add_argument("--n", type=positive_int, default=500, help="queries per stream (default %(default)s)")
    ap.add_argument("--policies", default="clear,clear-cost,clear-cost-emp", help="markets (default %(default)s)")
    ap.add_argument("--refit-every", type=positive_int, default=50, help="settled queries between refits (default %(default)s)")
    ap.add_argument("--prior-weight", type=float, default=30.0,
                    help="observations each prior calibration bin is worth (default %(default)s)")
    ap.add_argument("--context-limit-tokens", type=float, default=8192.0, help="largest cap (default %(default)s)")
    ap.add_argument("--features-cache", type=Path, default=None,
                    help="encoder features of the pool (default artifacts/features/<pool>.npz)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _run(args) -> int:
    from clear_bench.learning import LengthModel, TrafficLearner, serve_learning
    from clear_core.policies import get_policy
    from clear_core.simulate import solved_mask
    from clear_core.traces import load_pool, make_stream
    from clear_predictor.head import load_head

    problems = load_pool(args.traces)
    cache = args.features_cache or REPO / "artifacts" / "features" / f"{args.traces.stem}.npz"
    features = pool_features(problems, cache)
    head = load_head()
    prior = LengthModel(np.asarray(head.coef, dtype=float), float(head.intercept), head.calibration)
    oof_rmse = float(head.document["metrics"]["out_of_fold"]["per_query"]["overall"]["rmse_log"])
    alpha = float(head.alpha) / oof_rmse ** 2  # the head's ridge, in the censored fit's units
    policies = [p for p in args.policies.split(",") if p]
    ways = ["uniform"] + [w for p in policies for w in (p, f"{p}+learn")]
    cells = []
    t0 = time.perf_counter()
    for stream in args.streams.split(","):
        for b in args.budgets:
            for seed in args.seeds:
                warm = make_stream(problems, stream, n=args.n, seed=seed + 100)
                evaluation = make_stream(problems, stream, n=args.n, seed=seed)
                x = np.array([features[i] for i in warm.problem_ids + evaluation.problem_ids])
                acc = {}
                for way in ways:
                    name, learn = way.removesuffix("+learn"), way.endswith("+learn")
                    policy = get_policy(name)
                    learner = TrafficLearner(prior, x, alpha=alpha, refit_every=args.refit_every,
                                             prior_weight=args.prior_weight, learn=learn)
                    if learn:
                        serve_learning(policy, learner, warm.tokens, b, context_limit_tokens=args.context_limit_tokens)
                    caps = serve_learning(policy, learner, evaluation.tokens, b,
                                          context_limit_tokens=args.context_limit_tokens,
                                          rows=np.arange(args.n) + args.n)
                    acc[way] = 100.0 * float(solved_mask(caps, evaluation.tokens, evaluation.correct).mean())
                cells.append({"stream": stream, "budget": b, "seed": seed, "accuracy": acc})
                print(f"{stream:>12} {b:>4} seed {seed}: " + "  ".join(f"{w} {acc[w]:.1f}" for w in ways), flush=True)
    print(f"\n{len(cells)} cells in {time.perf_counter() - t0:.0f} s; accuracy (percent solved) averaged over seeds\n")
    print("| stream | budget | " + " | ".join(ways) + " |")
    print("|---|---|" + "---|" * len(ways))
    summary = {}
    for stream in args.streams.split(","):
        for b in args.budgets:
            mine = [c for c in cells if c["stream"] == stream and c["budget"] == b]
            mean = {w: float(np.mean([c["accuracy"][w] for c in mine])) for w in ways}
            summary[f"{stream}/{b}"] = mean
            best = max(mean.values())
            print(f"| {stream} | {b} | " + " | ".join(
                f"**{mean[w]:.1f}**" if mean[w] == best else f"{mean[w]:.1f}" for w in ways) + " |")
    beats = {w: sum(m[w] > m["uniform"] for m in summary.values()) for w in ways[1:]}
    worst = {w: min(m[w] - m["uniform"] for m in summary.values()) for w in ways[1:]}
    print("\ncells above uniform (of %d): " % len(summary) + ", ".join(f"{w} {beats[w]}" for w in ways[1:]))
    print("worst cell against uniform (points): " + ", ".join(f"{w} {worst[w]:+.1f}" for w in ways[1:]))
    print(json.dumps({"pool": str(args.traces), "n": args.n, "seeds": args.seeds, "refit_every": args.refit_every,
                      "prior_weight": args.prior_weight, "summary": summary, "cells_above_uniform": beats,
                      "worst_against_uniform": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
