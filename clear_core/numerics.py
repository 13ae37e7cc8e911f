"""The two numerical steps every solver of this package shares, written once.

:func:`bisect_monotone`
    Bisection on a monotone predicate: the shadow price of every market is the
    boundary between "demand exceeds the budget" (price too low) and "demand
    fits" (price high enough). Demand is a step function with jumps (a query
    turning insolvent drops out at once), so a root finder that needs a
    continuous sign change (``scipy.optimize.brentq``) does not apply; the
    bisection keeps the bracket's feasible end instead. Works on scalars and,
    elementwise, on arrays of brackets (one bisection per element).
:func:`integer_caps`
    Real caps -> integer tokens under a budget: floor, take back any excess
    from the largest caps (floating round-off at demand == budget), then
    optionally hand the whole tokens left over to the caps with the largest
    fractional parts, never above a per-query limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Added before flooring, so a cap computed as 99.9999999999 for 100 stays 100.
FLOOR_EPSILON = 1e-9


@dataclass(frozen=True)
class Bisection:
    """Outcome of :func:`bisect_monotone` (scalars, or arrays for array brackets)."""

    lo: float | np.ndarray  # last point where ``below`` held
    hi: float | np.ndarray  # last point where it did not
    iterations: int  # midpoints evaluated
    converged: bool  # every bracket narrower than the tolerance


def bisect_monotone(
    below: Callable,
    lo,
    hi,
    *,
    tolerance: float,
    max_iterations: int,
) -> Bisection:
    """Narrow ``[lo, hi]`` to the boundary of a monotone predicate.

    ``below(x)`` must be true on ``[lo, boundary)`` and false on
    ``[boundary, hi]``. Each step evaluates the midpoint and keeps the half
    containing the boundary, so the caller can keep the side it needs: a
    price search (``below`` = demand exceeds the budget) answers ``hi``, the
    lowest price found whose demand fits; a slack search (``below`` = demand
    fits) answers ``lo``. With array brackets ``below`` gets an array of
    midpoints and returns a boolean array; the search stops when every bracket
    is narrower than ``tolerance`` or after ``max_iterations`` midpoints.
    """
    scalar = np.ndim(lo) == 0 and np.ndim(hi) == 0
    lo = np.asarray(lo, dtype=float).copy()
    hi = np.asarray(hi, dtype=float).copy()
    iterations = 0
    converged = bool(np.all(hi - lo < tolerance))
    while not converged and iterations < max_iterations:
        iterations += 1
        mid = 0.5 * (lo + hi)
        low = np.asarray(below(float(mid) if scalar else mid), dtype=bool)
        lo = np.where(low, mid, lo)
        hi = np.where(low, hi, mid)
        converged = bool(np.all(hi - lo < tolerance))
    if scalar:
        return Bisection(float(lo), float(hi), iterations, converged)
    return Bisection(lo, hi, iterations, converged)


def integer_caps(real_caps, budget: float, *, limit=None) -> np.ndarray:
    """Integer caps that never sum to more than ``floor(budget)``.

    Parameters
    ----------
    real_caps : real-valued caps in tokens (0 = abandoned).
    budget : the budget the caps must fit, in tokens.
    limit : ``None`` to floor only. Otherwise the most tokens each query may
        get (scalar or per query; ``inf`` for none): the whole tokens the
        flooring left under the budget go, one at a time, to the queries with a
        positive real cap and the largest fractional parts (ties in index
        order), passing over the list again while tokens and room remain.
    """
    real = np.asarray(real_caps, dtype=float)
    caps = np.maximum(np.floor(real + FLOOR_EPSILON), 0).astype(np.int64)
    whole_budget = int(math.floor(budget))
    excess = int(caps.sum()) - whole_budget
    while excess > 0:  # round-off at demand == budget: one token back from each of the largest
        take = np.argsort(-caps, kind="stable")[: min(excess, int((caps > 0).sum()))]
        caps[take] -= 1
        excess -= take.size
    if limit is None:
        return caps
    remainder = whole_budget - int(caps.sum())
    if remainder <= 0:
        return caps
    bound = np.broadcast_to(np.asarray(limit, dtype=float), real.shape)
    room = np.where(real > 0, np.floor(np.minimum(bound, np.iinfo(np.int64).max / 2)) - caps, 0).astype(np.int64)
    room = np.maximum(room, 0)
    order = np.argsort(-(real - np.floor(real + FLOOR_EPSILON)), kind="stable")
    while remainder > 0:
        give = order[room[order] > 0][:remainder]
        if give.size == 0:
            break
        caps[give] += 1
        room[give] -= 1
        remainder -= give.size
    return caps
