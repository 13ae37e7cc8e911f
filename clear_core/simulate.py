"""Offline simulator: score caps against recorded traces (Sec. 6).

A query with cap ``t`` is solved iff ``t >= tokens and correct``: a cap never
changes the tokens generated before it, it only cuts them off. What an engine
would really generate is ``min(cap, tokens)``; the rest of the cap is refunded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.numerics import bisect_integer


@dataclass(frozen=True)
class Score:
    n_queries: int
    solved: int  # queries with cap >= tokens and a correct answer
    accuracy: float  # solved / n_queries
    tokens_allocated: int  # sum of caps (what the budget reserves)
    tokens_consumed: int  # sum of min(cap, tokens) (what an engine generates)
    abandonment_rate: float  # share of queries with cap 0
    unused_budget: int  # budget - tokens_allocated
    solved_per_1k_allocated: float
    solved_per_1k_consumed: float

    def as_dict(self) -> dict:
        return asdict(self)


def solved_mask(caps, tokens, correct) -> np.ndarray:
    caps = np.asarray(caps)
    tokens = np.asarray(tokens)
    return (caps > 0) & (caps >= tokens) & np.asarray(correct, dtype=bool)


def score(caps, tokens, correct, budget: float) -> Score:
    """Accuracy and token accounting of one allocation on one stream."""
    caps = np.asarray(caps, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if caps.shape != tokens.shape:
        raise InvalidInputError("caps", f"shape {caps.shape}", f"must match tokens {tokens.shape}")
    if (caps < 0).any():
        raise InvalidInputError("caps", int(caps.min()), "caps must be >= 0")
    return score_outcome(caps, solved_mask(caps, tokens, correct), np.minimum(caps, tokens), budget)


def score_outcome(caps, solved, generated, budget: float) -> Score:
    """The :class:`Score` of caps whose queries were ``solved`` having ``generated`` tokens each
    (one trajectory per query in :func:`score`; several in :mod:`clear_core.best_of_k`)."""
    caps = np.asarray(caps, dtype=np.int64)
    solved = int(np.asarray(solved, dtype=bool).sum())
    allocated = int(caps.sum())
    consumed = int(np.asarray(generated, dtype=np.int64).sum())
    n = int(caps.size)
    return Score(
        n_queries=n,
        solved=solved,
        accuracy=solved / n if n else 0.0,
        tokens_allocated=allocated,
        tokens_consumed=consumed,
        abandonment_rate=float((caps == 0).mean()) if n else 0.0,
        unused_budget=int(budget) - allocated,
        solved_per_1k_allocated=1000.0 * solved / allocated if allocated else 0.0,
        solved_per_1k_consumed=1000.0 * solved / consumed if consumed else 0.0,
    )


def generated_under_uniform_cap(tokens, cap: int) -> int:
    """Tokens an engine generates when every query gets ``cap``: ``sum(min(cap, tokens))``."""
    return int(np.minimum(np.asarray(tokens, dtype=np.int64), int(cap)).sum())


def uniform_cap_within(tokens, target: float, context_limit_tokens: float | None = None) -> int:
    """The largest uniform cap (at most the context limit) whose generated tokens stay within ``target``.

    ``sum(min(c, tokens))`` is nondecreasing in ``c``, so an integer bisection
    finds it; past the longest query it no longer grows, so when all of them
    fit the cap is the context limit (or the longest query without one).
    """
    d = np.sort(np.asarray(tokens, dtype=np.int64))
    if d.size == 0:
        return 0
    top = int(d[-1]) if context_limit_tokens is None else int(context_limit_tokens)
    if generated_under_uniform_cap(d, top) <= target:
        return top
    prefix = np.concatenate([[0], np.cumsum(d)])

    def generated(c: int) -> int:
        k = int(np.searchsorted(d, c, side="left"))  # queries shorter than c generate their length
        return int(prefix[k]) + c * (d.size - k)

    # generated(0) <= target < generated(top): the first cap over the target, less one.
    return bisect_integer(lambda c: generated(c) > target, 0, top) - 1
