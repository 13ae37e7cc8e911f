"""Best-of-k under one budget (the paper's code-generation protocol, Table 2).

A best-of-k *query* is one problem with ``k`` recorded trajectories (its first
``k`` samples, in the recorded order). A policy gives the query a total budget
``C`` (its allocation: the policies are unchanged, each query's threshold is
``k`` times the per-trajectory prediction), which is spent in one of two ways:

* ``parallel`` (the paper): the ``k`` trajectories run at once, each capped at
  ``C // k``; solved iff some trajectory fits its cap and passed the tests;
  generated tokens are ``sum_j min(C // k, tokens_j)``.
* ``sequential`` (what a server with a verifier would do): trajectories run
  one after another, each capped by what is left of ``C``, stopping at the
  first that fits and passed; generated tokens are what the trajectories used.

:func:`minimal_budget` is the least ``C`` that solves a query under each
protocol (what the oracle allocates): ``k * min_{j correct} tokens_j`` in
parallel, ``tokens_1 + ... + tokens_{j*}`` up to the first correct trajectory
``j*`` in sequence. Every trajectory cap is also held to the context limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.traces import Problem, Stream, _mixture, draw_by_stratum

PROTOCOLS = ("parallel", "sequential")


@dataclass(frozen=True)
class TrialStream:
    """``N`` best-of-k queries: ``stream`` holds one row per query (its ``tokens`` are the median
    trajectory length, which ``oracle-noise`` predictions perturb); the matrices hold every trajectory."""

    stream: Stream
    k: int
    tokens: np.ndarray  # (N, k) recorded trajectory lengths
    correct: np.ndarray  # (N, k) passed the unit tests

    def __len__(self) -> int:
        return len(self.stream)


def make_trial_stream(problems: Sequence[Problem], mixture: str | Sequence[float], n: int, seed: int, k: int) -> TrialStream:
    """Draw ``n`` problems by stratum (the pool family's streams); each query keeps its first ``k`` samples."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError("k", k, "must be an integer >= 1")
    short = [p.id for p in problems if len(p.samples) < k]
    if short:
        raise InvalidInputError("k", k, f"{len(short)} problems have fewer samples, e.g. {short[0]!r}")
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise InvalidInputError("n", n, "must be a positive integer")
    name, strata, weights = _mixture(problems, mixture)
    rng = np.random.default_rng(seed)
    chosen = draw_by_stratum(list(problems), [p.tier for p in problems], strata, weights, n, rng, name)
    tokens = np.array([[s.tokens for s in p.samples[:k]] for p in chosen], dtype=np.int64)
    correct = np.array([[s.correct for s in p.samples[:k]] for p in chosen], dtype=bool)
    stream = Stream(
        name=name,
        seed=seed,
        problem_ids=tuple(p.id for p in chosen),
        prompts=tuple(p.problem for p in chosen),
        sample_index=np.zeros(len(chosen), dtype=np.int64),
        tokens=np.median(tokens, axis=1).round().astype(np.int64),
        correct=correct.any(axis=1),
        tiers=tuple(p.tier for p in chosen),
        datasets=tuple(p.dataset for p in chosen),
    )
    return TrialStream(stream, int(k), tokens, correct)


@dataclass(frozen=True)
class TrialOutcome:
    solved: np.ndarray  # (N,) the query was solved
    generated: np.ndarray  # (N,) tokens its trajectories generated
    longest: np.ndarray  # (N,) its longest single trajectory (the tail a GPU batch waits for)


def run_trials(caps, tokens, correct, protocol: str, context_limit_tokens: int | None = None) -> TrialOutcome:
    """Spend each query's total budget ``caps[i]`` on its trajectories under ``protocol``."""
    caps = np.asarray(caps, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    correct = np.asarray(correct, dtype=bool)
    if tokens.ndim != 2 or tokens.shape != correct.shape or caps.shape != tokens.shape[:1]:
        raise InvalidInputError("trials", f"caps {caps.shape}, tokens {tokens.shape}", "caps (N,), tokens and correct (N, k)")
    if (caps < 0).any():
        raise InvalidInputError("caps", int(caps.min()), "caps must be >= 0")
    limit = np.iinfo(np.int64).max if context_limit_tokens is None else int(context_limit_tokens)
    n, k = tokens.shape
    if protocol == "parallel":
        per = np.minimum(caps // k, limit)[:, None]
        used = np.minimum(per, tokens)
        solved = ((per > 0) & (tokens <= per) & correct).any(axis=1)
        return TrialOutcome(solved, used.sum(axis=1), used.max(axis=1) if k else np.zeros(n, np.int64))
    if protocol == "sequential":
        left = caps.copy()
        solved = np.zeros(n, dtype=bool)
        generated = np.zeros(n, dtype=np.int64)
        longest = np.zeros(n, dtype=np.int64)
        for j in range(k):
            cap_j = np.where(solved, 0, np.minimum(left, limit))
            used = np.minimum(cap_j, tokens[:, j])
            solved |= (cap_j > 0) & (tokens[:, j] <= cap_j) & correct[:, j]
            left -= used
            generated += used
            longest = np.maximum(longest, used)
        return TrialOutcome(solved, generated, longest)
    raise InvalidInputError("protocol", protocol, f"expected one of {PROTOCOLS}")


def minimal_budget(tokens, correct, protocol: str, context_limit_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(least total budget that solves each query, solvable at all) under ``protocol``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    correct = np.asarray(correct, dtype=bool)
    limit = np.iinfo(np.int64).max if context_limit_tokens is None else int(context_limit_tokens)
    fits = correct & (tokens <= limit)
    solvable = fits.any(axis=1)
    k = tokens.shape[1]
    if protocol == "parallel":
        best = np.where(fits, tokens, np.iinfo(np.int64).max).min(axis=1)
        return np.where(solvable, k * best, 0), solvable
    if protocol == "sequential":
        first = np.argmax(fits, axis=1)  # the first trajectory that fits and passed
        before = np.cumsum(np.minimum(tokens, limit), axis=1)
        need = before[np.arange(tokens.shape[0]), first]
        return np.where(solvable, need, 0), solvable
    raise InvalidInputError("protocol", protocol, f"expected one of {PROTOCOLS}")
