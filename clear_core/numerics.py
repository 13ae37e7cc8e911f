"""The numerical steps every solver of this package shares, written once.

:func:`bisect_monotone`
    Bisection on a monotone predicate: the shadow price of every market is the
    boundary between "demand exceeds the budget" (price too low) and "demand
    fits" (price high enough). Demand is a step function with jumps (a query
    turning insolvent drops out at once), so a root finder that needs a
    continuous sign change (``scipy.optimize.brentq``) does not apply; the
    bisection keeps the bracket's feasible end instead. Works on scalars and,
    elementwise, on arrays of brackets (one bisection per element).
:func:`secant_bisect`
    The same boundary when the predicate comes with a signed excess (demand
    minus budget): secant steps on the excess, alternating with bisection, so
    a smooth stretch converges superlinearly and a jump costs at most a
    bisection every other probe (a secant alone stalls at a jump).
:func:`floor_caps`
    Real caps -> whole tokens: floor, after :data:`FLOOR_EPSILON` so that
    round-off does not drop a token.
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
#: A secant step of :func:`secant_bisect` lands at least this share of the bracket inside it.
SECANT_MARGIN = 0.01


@dataclass(frozen=True)
class Bisection:
    """Outcome of :func:`bisect_monotone` or :func:`secant_bisect` (scalars, or arrays for array brackets)."""

    lo: float | np.ndarray  # last point where ``below`` held (the excess was > 0)
    hi: float | np.ndarray  # last point where it did not
    iterations: int  # points evaluated
    converged: bool  # every bracket within the tolerance


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


def secant_bisect(
    excess: Callable[[float], float],
    lo: float,
    hi: float,
    f_lo: float,
    f_hi: float,
    *,
    tolerance: float,
    max_iterations: int,
) -> Bisection:
    """Narrow ``[lo, hi]`` to the boundary of ``excess(x) > 0``, a non-increasing step function.

    ``f_lo = excess(lo) > 0 >= f_hi = excess(hi)``. Probes alternate between a
    secant step (kept :data:`SECANT_MARGIN` of the bracket inside it) and the
    midpoint, so the bracket at least halves every two probes even where the
    excess jumps. Answers ``hi``, the lowest point found where the excess is
    not positive (a price search: the lowest price whose demand fits), and
    ``converged`` when ``hi - lo <= tolerance``.
    """
    iterations, use_secant = 0, True
    while hi - lo > tolerance and iterations < max_iterations:
        mid = 0.5 * (lo + hi)
        if use_secant and f_lo > f_hi:
            guess = lo + (hi - lo) * f_lo / (f_lo - f_hi)
            margin = SECANT_MARGIN * (hi - lo)
            mid = min(max(guess, lo + margin), hi - margin)
        f = excess(mid)
        iterations += 1
        if f > 0:
            lo, f_lo = mid, f
        else:
            hi, f_hi = mid, f
        use_secant = not use_secant
    return Bisection(lo, hi, iterations, hi - lo <= tolerance)


def bisect_integer(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest integer in ``(lo, hi]`` where the monotone predicate ``fits`` holds.

    ``fits(lo)`` must be false (or ``lo`` outside the domain) and ``fits(hi)`` true; ``fits`` is false
    below some boundary and true from it on. ``O(log(hi - lo))`` probes. A caller that needs the largest
    integer where a predicate holds asks for the boundary of its negation and steps back by one.
    """
    lo, hi = int(lo), int(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def floor_caps(real_caps) -> np.ndarray:
    """Real caps -> whole tokens (int64), floored after :data:`FLOOR_EPSILON` (a cap computed as
    99.9999999999 for 100 stays 100)."""
    return np.floor(np.asarray(real_caps, dtype=float) + FLOOR_EPSILON).astype(np.int64)


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
    caps = floor_caps(np.maximum(real, 0))
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
