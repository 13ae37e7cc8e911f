"""The offline bench: streams x budgets x policies x seeds on a trace pool."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from clear_core.policies import Truth, parse_policy
from clear_core.simulate import score
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, Problem, Stream, make_stream
from clear_bench.predictions import Predictions



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
) -> list[dict]:
    """Score every cell of the grid; one result row per (stream, budget, policy, seed).

    Each (stream, seed) draws one stream and one set of predicted thresholds,
    shared by every budget and policy, so the comparison is paired.
    """
    policy_objs = {spec: parse_policy(spec) for spec in policies}
    rows: list[dict] = []
    for stream_name in streams:
        for seed in seeds:
            stream = make_stream(problems, stream_name, n_queries, seed)
            thresholds = predictions.thresholds(stream)
            truth = Truth(tokens=stream.tokens, correct=stream.correct)
            for bpq in budgets:
                budget = int(bpq) * len(stream)
                for spec, policy in policy_objs.items():
                    alloc = policy.allocate(
                        thresholds, budget, context_limit_tokens=context_limit_tokens, truth=truth, log_sigma=predictions.sigma
                    )
                    s = score(alloc.caps, stream.tokens, stream.correct, budget)
                    consumed = np.minimum(alloc.caps, stream.tokens)
                    rows.append(
                        {
                            "stream": stream_name,
                            "budget_per_query": int(bpq),
                            "policy": spec,
                            "seed": int(seed),
                            "predictions": predictions.spec,
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
                            "solved_per_1k_allocated": s.solved_per_1k_allocated,
                            "solved_per_1k_consumed": s.solved_per_1k_consumed,
                            # The longest generation keeps a GPU batch busy (ARCHITECTURE.md).
                            "longest_generation_tokens": int(consumed.max()) if consumed.size else 0,
                        }
                    )
                    if on_allocation is not None:
                        on_allocation(Cell(stream_name, int(bpq), spec, int(seed)), stream, alloc.caps)
                    if progress is not None:
                        progress(1)
    return rows
