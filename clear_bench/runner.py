"""The offline bench: streams x budgets x policies x seeds on a trace pool."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from clear_core.best_of_k import PROTOCOLS, make_trial_stream, minimal_budget, run_trials
from clear_core.policies import Allocation, Truth, parse_policy
from clear_core.simulate import score, score_outcome, solved_mask, uniform_cap_within
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, Problem, Stream, make_stream, split_halves
from clear_core.servable import ServableMarket
from clear_bench.online import StreamInputs, best_served_uniform, serve_online, stream_inputs
from clear_bench.predictions import Predictions

#: --protocol values: one sample per query (the math experiments), or best-of-k (parallel or sequential).
BENCH_PROTOCOLS = ("single", "best-of-k", "sequential", "online")
#: Seed offset of the warm-up stream's draw (independent of the scored stream's).
WARMUP_SEED_OFFSET = 7_919


@dataclass(frozen=True)
class WarmUp:
    """``--warmup-queries``: ``queries`` arrivals from one half of the pool served before the scored
    stream (drawn from the other half), in one run; ``learn``: the length model learns from them."""

    queries: int = 0
    learn: bool = False
    refit_every: int = 50
    prior_weight: float = 30.0
    exploration: object = None  # clear_core.exploration.Exploration of the warm-up when learning



@dataclass(frozen=True)
class Cell:
    stream: str
    budget_per_query: int
    policy: str
    seed: int


def run_grid(
    problems: Sequence[Problem],
    predictions: Predictions,
    *,
    streams: Iterable[str],
    budgets: Iterable[int],
    policies: Iterable[str],
    seeds: Iterable[int],
    n_queries: int = 500,
    context_limit_tokens: float | None = POOL_GENERATION_CAP_TOKENS,
    on_allocation: Callable[[Cell, Stream, np.ndarray], None] | None = None,
    progress: Callable[[int], None] | None = None,
    protocol: str = "single",
    k: int = 1,
    in_flight: int = 0,
    warmup: WarmUp = WarmUp(),
) -> list[dict]:
    """Score every cell of the grid; one result row per (stream, budget, policy, seed).

    Each (stream, seed) draws one stream and one set of predicted thresholds,
    shared by every budget and policy, so the comparison is paired.

    ``protocol`` ``best-of-k`` / ``sequential`` (:mod:`clear_core.best_of_k`):
    a query is a problem with its first ``k`` trajectories; a policy allocates
    each query ``k`` times its per-trajectory threshold (the budget per query
    is the total over its trajectories), the oracle the least budget that
    solves it, and the trajectories spend it in parallel (``C // k`` each) or
    in sequence.

    ``protocol`` ``online`` (:mod:`clear_bench.online`): the same streams, each
    query priced on arrival by the online market and settled with what it
    generated (``in_flight`` arrivals later), as the allocator serves them.

    ``warmup`` (online only): for each (stream, seed), the pool is split in
    halves by a seeded hash of the problem ids (:func:`clear_core.traces.split_halves`);
    ``warmup.queries`` arrivals with the stream's mix are drawn from the
    first half and the scored stream from the second. Each servable policy
    serves the warm-up and then the scored stream as one run (one ledger in
    blocks of ``n_queries`` arrivals, one pricing window); only the scored
    stream is scored. With ``warmup.learn`` the length model is refitted from
    the warm-up's settled queries (:mod:`clear_bench.learning`) and frozen for
    the scored stream; each run starts from the head as given.
    """
    if protocol not in BENCH_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {BENCH_PROTOCOLS}")
    single = protocol in ("single", "online")  # one sample per query
    if not single and "uniform-generated" in policies:
        raise ValueError("uniform-generated is a single-sample baseline (it needs one length per query)")
    if warmup.queries and protocol != "online":
        raise ValueError("a warm-up is served online: use it with protocol online")
    if warmup.learn and (not warmup.queries or predictions.kind != "head"):
        raise ValueError("learning needs a warm-up and head predictions (the head learns from encoder features)")
    policy_objs = {spec: parse_policy(spec) for spec in policies}
    rows: list[dict] = []
    for stream_name in streams:
        for seed in seeds:
            warm = None
            if warmup.queries:
                first, second = split_halves(problems, seed)
                warm = make_stream(first, stream_name, warmup.queries, seed + WARMUP_SEED_OFFSET)
            if single:
                stream = make_stream(problems if warm is None else second, stream_name, n_queries, seed)
                thresholds = predictions.thresholds(stream)
                priced = predictions.distribution(stream)  # (median, spread, runaway) per query
                lengths = predictions.empirical(stream)  # each query's empirical histogram
                truth = Truth(tokens=stream.tokens, correct=stream.correct)
                limit = context_limit_tokens
                told = stream_inputs(predictions, stream) if protocol == "online" else None
                trials, spend = None, None
            else:
                spend = PROTOCOLS[0] if protocol == "best-of-k" else PROTOCOLS[1]
                trials = make_trial_stream(problems, stream_name, n_queries, seed, k)
                stream = trials.stream
                thresholds = k * predictions.thresholds(stream)  # per trajectory, times k per query
                # Calibration is per trajectory; a query of k trajectories keeps the raw spread.
                priced, lengths = (thresholds, predictions.sigma, 0.0), None
                need, solvable = minimal_budget(trials.tokens, trials.correct, spend, context_limit_tokens)
                truth = Truth(tokens=need, correct=solvable)
                limit = None if context_limit_tokens is None else k * context_limit_tokens
            for bpq in budgets:
                budget = int(bpq) * len(stream)
                # With requests in flight the fair uniform baseline holds its caps in the same ledger.
                served = (best_served_uniform(stream.tokens, stream.correct, int(bpq), in_flight=in_flight,
                                              context_limit_tokens=limit)
                          if protocol == "online" and in_flight else None)
                for spec, policy in policy_objs.items():
                    curve, explored = None, {}
                    if protocol == "online" and isinstance(policy, ServableMarket):  # served as a deployment would
                        if warm is None:
                            caps = serve_online(policy, told, stream.tokens, int(bpq), context_limit_tokens=limit,
                                                in_flight=in_flight)
                        else:
                            caps, curve = _served_after_warmup(policy, predictions, warm, stream, told, int(bpq),
                                                               warmup, limit, in_flight, explored)
                        alloc = Allocation(caps=caps, shadow_price=math.nan, active=caps > 0)
                    elif policy.prices_length_histograms:  # prices each query's empirical length distribution
                        alloc = policy.allocate(thresholds, budget, context_limit_tokens=limit, truth=truth,
                                                lengths=lengths)
                    elif policy.charges_generated_tokens:  # prices each query's calibrated length distribution
                        alloc = policy.allocate(priced[0], budget, context_limit_tokens=limit, truth=truth,
                                                log_sigma=priced[1], runaway=priced[2])
                    elif predictions.as_served and isinstance(policy, ServableMarket) and trials is None:
                        # told what serving tells it: the calibrated median and spread
                        alloc = policy.allocate(priced[0], budget, context_limit_tokens=limit, truth=truth,
                                                log_sigma=priced[1])
                    else:
                        alloc = policy.allocate(thresholds, budget, context_limit_tokens=limit, truth=truth,
                                                log_sigma=predictions.sigma)
                    matched = None
                    if trials is None:
                        s = score(alloc.caps, stream.tokens, stream.correct, budget)
                        consumed = np.minimum(alloc.caps, stream.tokens)
                        # The uniform cap that generates (at most) what this policy generated.
                        cap_u = uniform_cap_within(stream.tokens, s.tokens_consumed, context_limit_tokens)
                        matched = (cap_u, float(solved_mask(np.full(len(stream), cap_u), stream.tokens,
                                                            stream.correct).mean()))
                    else:
                        out = run_trials(alloc.caps, trials.tokens, trials.correct, spend, context_limit_tokens)
                        s = score_outcome(alloc.caps, out.solved, out.generated, budget)
                        consumed = out.longest
                    rows.append(
                        {
                            "stream": stream_name,
                            "protocol": (protocol if trials is None else f"{protocol}:{k}")
                            + (f":in_flight={in_flight}" if protocol == "online" and in_flight else ""),
                            "budget_per_query": int(bpq),
                            "policy": spec,
                            "seed": int(seed),
                            "predictions": predictions.spec,
                            "calibration": predictions.calibration,
                            "log_sigma": predictions.sigma,
                            "accuracy": s.accuracy,
                            "solved": s.solved,
                            "n_queries": s.n_queries,
                            "tokens_allocated": s.tokens_allocated,
                            "tokens_consumed": s.tokens_consumed,
                            "tokens_refunded": s.tokens_allocated - s.tokens_consumed,
                            "unused_budget": s.unused_budget,
                            "abandonment_rate": s.abandonment_rate,
                            "shadow_price": None if math.isnan(alloc.shadow_price) else alloc.shadow_price,
                            "beta": None if math.isnan(alloc.beta) else alloc.beta,
                            "generated_vs_budget": s.tokens_consumed / budget,
                            "uniform_matched_cap": None if matched is None else matched[0],
                            "uniform_matched_accuracy": None if matched is None else matched[1],
                            "uniform_served_cap": None if served is None else served[0],
                            "uniform_served_accuracy": None if served is None else served[1],
                            "solved_per_1k_allocated": s.solved_per_1k_allocated,
                            "solved_per_1k_consumed": s.solved_per_1k_consumed,
                            # The longest generation keeps a GPU batch busy (ARCHITECTURE.md).
                            "longest_generation_tokens": int(consumed.max()) if consumed.size else 0,
                            "warmup_queries": int(warmup.queries),
                            "learn": bool(warmup.learn),
                            **({} if curve is None else {"warmup_curve": curve}),
                            **({"warmup_probes": explored["probes"],
                                "warmup_probe_generated_tokens": explored["probe_generated_tokens"]}
                               if explored and warmup.learn else {}),
                        }
                    )
                    if on_allocation is not None:
                        on_allocation(Cell(stream_name, int(bpq), spec, int(seed)), stream, alloc.caps)
                    if progress is not None:
                        progress(1)
    return rows



def _served_after_warmup(policy, predictions: Predictions, warm: Stream, stream: Stream, told: StreamInputs,
                         budget_per_query: int, warmup: WarmUp, limit, in_flight: int,
                         explored: dict) -> tuple[np.ndarray, list]:
    """The scored stream's caps when ``warm`` is served first in the same run, and the warm-up curve."""
    from clear_bench.learning import LearningInputs, warmup_curve
    from clear_core.length_model import prompt_group_of

    tokens = np.concatenate([warm.tokens, stream.tokens])
    if warmup.learn:
        features = np.concatenate([predictions.stream_features(warm), predictions.stream_features(stream)])
        groups = np.array([prompt_group_of(p) for p in warm.prompts + stream.prompts], dtype=np.int64)
        inputs = LearningInputs(predictions.head.model, features, groups, predictions.head.alpha,
                                refit_every=warmup.refit_every, prior_weight=warmup.prior_weight)
    else:
        inputs = StreamInputs.concat(stream_inputs(predictions, warm), told)
    trace: list = []
    caps = serve_online(policy, inputs, tokens, budget_per_query, context_limit_tokens=limit, in_flight=in_flight,
                        trace=trace, block_queries=len(stream), learn_until=len(warm) if warmup.learn else 0,
                        exploration=warmup.exploration, explored=explored)
    return caps[len(warm):], warmup_curve(trace, warm.tokens, warm.correct, len(warm))
