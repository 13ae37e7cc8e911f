"""The market on expected generated tokens with *empirical* length distributions (``clear-cost-emp``).

:mod:`clear_core.consumption` prices each query's length as a log-normal
(plus a runaway share). Real lengths are not log-normal: a query predicted
long often either answers briefly or runs long (and then is often wrong), so
its distribution is bimodal, and a log-normal market abandons queries whose
short answers a small cap would still catch. Here each query's length
relative to its prediction, ``r = ln(D / tau_hat)``, follows the *histogram*
of the calibration bin its prediction falls in (:class:`LengthHistogram`,
fitted out of fold by :func:`clear_core.calibration.fit_calibration`), which
also records whether each finished sample was correct. A cap
``c = tau_hat exp(u_g)`` on the grid :data:`LOG_RATIO_GRID` is worth

    w V_g,  V_g = P(finished within the cap and correct)

(``w`` the tenant weight) and costs ``tau_hat C_g`` expected generated tokens,
``C_g = sum_{k <= g} m_k exp(u_k) + exp(u_g) P(not finished by u_g)`` (a
sample in cell ``k`` is costed at its cell's upper edge, runaways at the cap).

Solver (exact for the grid)
---------------------------
At price ``lam`` a query picks the cap maximising ``w V - lam tau_hat C``,
i.e. the vertex of the upper concave hull of its bin's points ``(C_g, V_g)``
where the hull's slope crosses ``p = lam tau_hat / w`` (cap 0, the origin, if
the first slope is already below ``p``: rational abandonment). The context
limit allows only the grid points up to ``m = max{g : tau_hat e^{u_g} <= t_max}``,
so the relevant hull is that of a *prefix*; the monotone-chain construction
gives every prefix hull at once as a tree of predecessor pointers (the stack
below a point never changes while it is on it), and binary lifting on that
tree finds the vertex for ``(m, p)`` in ``O(log G)``. Demand is then
``O(T log G)`` per price probe for ``T`` types (rounded thresholds, bin,
weight), non-increasing in the price; the price is the boundary of
``demand > B`` (:func:`clear_core.consumption.log_price_boundary`). Demand jumps when
queries move to a cheaper vertex; the budget left at the boundary upgrades as
many of the marginal queries as it covers (all upgrades there have the same
value per token, the price).

A second budget: the caps themselves (reservations)
----------------------------------------------------
A served request holds its whole cap in the ledger until it settles. With
``K`` requests in flight the pool must hold about ``K`` caps at once, so a
server also has a budget on the *sum of caps* (``cap_budget``, or the mean
cap of the admitted queries, ``mean_cap_budget``; see
:class:`clear_core.online_market.OnlineMarket`). The problem with both
budgets, ``sum E[min(D, c)] <= B`` and ``sum c <= R``, has two prices,
``lam`` on expected tokens and ``mu`` on reserved ones. Writing
``mu = nu theta`` and ``lam = nu (1 - theta)``, each query maximises
``w V - nu tau ((1 - theta) C_g + theta exp(u_g))``: the one-budget market
above on the combined cost, cleared against ``(1 - theta) B + theta R``
(the Lagrangian of both constraints with the same multipliers). When only
the expected-token budget binds, ``theta = 0`` (the market above); when
the caps do not fit, ``theta`` is the smallest value of the grid
:data:`RESERVATION_SHARES` (steps of 1/32) whose caps fit ``R``, found by
bisection (the sum of caps falls as ``theta`` grows; ``theta = 1`` clears
the caps alone and always fits). At that ``theta`` the combined budget
binds, so the expected tokens stay within ``B`` up to the grid step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from scipy.special import ndtr

from clear_core.consumption import (
    LOG_TAU_STEP, MAX_RUNAWAY, ConsumptionResult, log_price_boundary, _codes, eta_grid_index, eta_of_index, runaway_odds,
    sigma_grid_index, sigma_of_index,
)
from clear_core.errors import InvalidInputError
from clear_core.market import validate_budget, validate_context_limit, validate_thresholds
from clear_core.numerics import bisect_integer, floor_caps

#: Upper edges of the cells of ln(length / prediction): caps are tau_hat * exp(u_g).
LOG_RATIO_GRID = np.round(np.arange(-4.0, 9.0 + 1e-9, 1.0 / 32.0), 10)
#: Default kernel width (in ln length) that smooths a bin's histogram: a few hundred samples leave gaps,
#: and a gap in the value curve would read as "a longer cap never helps". Wider than the held-out likelihood
#: of lengths asks for (0.1-0.2): a market sets caps at the upper edge of a mode of the bin's lengths, and a
#: new problem's mode sits a little off its neighbours'; 0.25 moves those caps past the edge
#: (docs/results/cost-markets.md, "How the histogram defaults were chosen").
SMOOTHING_LOG = 0.25
_LEVELS = int(math.ceil(math.log2(LOG_RATIO_GRID.size + 2)))
#: The reservation prices' share theta = mu / (lam + mu) is searched on this grid (module docstring).
RESERVATION_SHARES = np.round(np.arange(0.0, 1.0 + 1e-9, 1.0 / 32.0), 10)


@dataclass(frozen=True)
class LengthHistogram:
    """One calibration bin's distribution of ln(length / prediction); the masses sum to 1."""

    correct: tuple[float, ...]  # mass of finished, correct answers per cell of LOG_RATIO_GRID
    wrong: tuple[float, ...]  # mass of finished, wrong answers per cell
    runaway: float  # mass that never finished (or finished past the grid)

    def __post_init__(self):
        c, w = np.asarray(self.correct), np.asarray(self.wrong)
        if c.shape != LOG_RATIO_GRID.shape or w.shape != LOG_RATIO_GRID.shape:
            raise InvalidInputError("histogram", c.shape, f"needs {LOG_RATIO_GRID.size} cells")
        total = c.sum() + w.sum() + self.runaway
        if (c < 0).any() or (w < 0).any() or self.runaway < 0 or abs(total - 1.0) > 1e-6:
            raise InvalidInputError("histogram", total, "masses must be >= 0 and sum to 1")

    @property
    def finished(self) -> np.ndarray:
        """Finished mass per cell (correct + wrong): what a cap's expected cost is computed from."""
        return np.asarray(self.correct) + np.asarray(self.wrong)

    @classmethod
    def fit(cls, log_ratio, correct, runaway, weights=None, smoothing: float = SMOOTHING_LOG) -> LengthHistogram:
        """From samples: ``log_ratio`` = ln(length / prediction), ``correct`` and ``runaway`` flags; the
        finished masses smoothed by a Gaussian kernel of width ``smoothing`` in ln length (0: none)."""
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise InvalidInputError("smoothing", smoothing, "must be finite and >= 0")
        r = np.asarray(log_ratio, dtype=float)
        w = np.ones(r.size) if weights is None else np.asarray(weights, dtype=float)
        ran = np.asarray(runaway, dtype=bool) | (r > LOG_RATIO_GRID[-1])
        ok = np.asarray(correct, dtype=bool) & ~ran
        cell = np.minimum(np.searchsorted(LOG_RATIO_GRID, r, side="left"), LOG_RATIO_GRID.size - 1)
        total = w.sum()
        good = _smooth(np.bincount(cell[ok], weights=w[ok], minlength=LOG_RATIO_GRID.size), smoothing) / total
        bad = _smooth(np.bincount(cell[~ok & ~ran], weights=w[~ok & ~ran], minlength=LOG_RATIO_GRID.size),
                      smoothing) / total
        runaway = max(0.0, float(w[ran].sum() / total))
        scale = (1.0 - runaway) / max(good.sum() + bad.sum(), 1e-300)  # exact sum 1 after smoothing
        return cls(tuple((good * scale).tolist()), tuple((bad * scale).tolist()), runaway)

    def mixed(self, other: LengthHistogram, share: float) -> LengthHistogram:
        """The mixture ``(1 - share) * self + share * other`` (both on the same grid)."""
        if not 0.0 <= share <= 1.0:
            raise InvalidInputError("share", share, "must be in [0, 1]")
        a = 1.0 - share
        return LengthHistogram(
            tuple((a * np.asarray(self.correct) + share * np.asarray(other.correct)).tolist()),
            tuple((a * np.asarray(self.wrong) + share * np.asarray(other.wrong)).tolist()),
            a * self.runaway + share * other.runaway,
        )

    def as_dict(self) -> dict:
        return {"correct": list(self.correct), "wrong": list(self.wrong), "runaway": self.runaway}

    @classmethod
    def from_dict(cls, d: dict) -> LengthHistogram:
        return cls(tuple(d["correct"]), tuple(d["wrong"]), float(d["runaway"]))


def _smooth(mass: np.ndarray, width: float) -> np.ndarray:
    """Gaussian kernel smoothing of cell masses, ``width`` in ln length (mass kept: what falls off the
    grid's ends is put back)."""
    if width <= 0:
        return np.asarray(mass, dtype=float)
    step = LOG_RATIO_GRID[1] - LOG_RATIO_GRID[0]
    half = int(math.ceil(3 * width / step))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) * step / width) ** 2)
    out = np.convolve(mass, k / k.sum(), mode="same")
    return out * (mass.sum() / out.sum()) if out.sum() > 0 else out


@lru_cache(maxsize=4096)
def lognormal_histogram(sigma: float, runaway: float) -> LengthHistogram:
    """``clear-cost``'s model of a length on the grid: log-normal around the threshold (its median) with
    spread ``sigma``, and a runaway share; every finished answer counts as correct, so a cap is worth its
    chance of finishing. Mass below the grid goes to its first cell, mass past it runs away."""
    cdf = ndtr(LOG_RATIO_GRID / sigma)
    finished = (1.0 - runaway) * np.diff(np.concatenate([[0.0], cdf]))
    return LengthHistogram(tuple(finished.tolist()), (0.0,) * LOG_RATIO_GRID.size, 1.0 - float(finished.sum()))


def lognormal_lengths(sigmas, runaway) -> EmpiricalLengths:
    """Each query's :func:`lognormal_histogram`, spreads and runaway odds rounded to ``clear-cost``'s grids."""
    sig = np.asarray(sigmas, dtype=float)
    rho = np.broadcast_to(np.clip(np.asarray(runaway, dtype=float), 0.0, MAX_RUNAWAY), sig.shape)
    key = np.stack([sigma_grid_index(sig), eta_grid_index(runaway_odds(rho))])
    keys, which = np.unique(key, axis=1, return_inverse=True)
    hists = []
    for j, e in keys.T:
        eta = eta_of_index(int(e))
        hists.append(lognormal_histogram(sigma_of_index(int(j)), eta / (1.0 + eta)))
    return EmpiricalLengths(tuple(hists), which.reshape(-1))


@dataclass(frozen=True)
class EmpiricalLengths:
    """Each query's length distribution: one of ``histograms``, by index."""

    histograms: tuple[LengthHistogram, ...]
    which: np.ndarray  # query -> index into histograms


@dataclass(frozen=True)
class _Chain:
    """Every prefix's upper concave hull of one histogram's (cost, value) points, as a predecessor tree."""

    cost: np.ndarray  # C_g per unit of prediction; index 0 is the origin (cap 0)
    value: np.ndarray  # V_g
    done: np.ndarray  # mass finished within the cell's upper edge (0 at the origin)
    spent: np.ndarray  # sum of mass * exp(upper edge) of those cells
    slope_in: np.ndarray  # slope of the hull edge ending at g (+inf at the origin)
    up: np.ndarray  # [level, g]: the 2^level-th predecessor of g on its prefix hull


@lru_cache(maxsize=8192)
def _chain(h: LengthHistogram, theta: float = 0.0) -> _Chain:
    """The hulls of ``h`` with cost ``(1 - theta) C_g + theta exp(u_g)`` (theta: the reservation share)."""
    good = np.asarray(h.correct)
    mass = h.finished
    done = np.cumsum(mass)
    cost = np.cumsum(mass * np.exp(LOG_RATIO_GRID)) + np.exp(LOG_RATIO_GRID) * np.maximum(1.0 - done, 0.0)
    cost = (1.0 - theta) * cost + theta * np.exp(LOG_RATIO_GRID)
    cost = np.concatenate([[0.0], cost + 1e-12 * np.arange(1, cost.size + 1)])  # strictly increasing
    value = np.concatenate([[0.0], np.cumsum(good)])
    n = cost.size
    pred = np.zeros(n, dtype=np.int64)
    slope = np.full(n, np.inf)
    stack = [0]
    for g in range(1, n):  # monotone chain: the upper hull of the points up to g is the stack
        while len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            # b is not above the segment a -> g: drop it
            if (value[b] - value[a]) * (cost[g] - cost[a]) <= (value[g] - value[a]) * (cost[b] - cost[a]):
                stack.pop()
            else:
                break
        pred[g] = stack[-1]
        slope[g] = (value[g] - value[pred[g]]) / (cost[g] - cost[pred[g]])
        stack.append(g)
    up = np.empty((_LEVELS, n), dtype=np.int64)
    up[0] = pred
    for j in range(1, _LEVELS):
        up[j] = up[j - 1][up[j - 1]]
    done_all = np.concatenate([[0.0], done])
    spent = np.concatenate([[0.0], np.cumsum(mass * np.exp(LOG_RATIO_GRID))])
    return _Chain(cost, value, done_all, spent, slope, up)


class _Demand:
    """Types' vertices and expected costs at a price (module docstring)."""

    def __init__(self, chains: Sequence[_Chain], hist_of_type, tau, weight, count, t_max: float, theta: float = 0.0):
        self.theta = theta
        sizes = np.array([c.cost.size for c in chains])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.cost = np.concatenate([c.cost for c in chains])
        self.done = np.concatenate([c.done for c in chains])
        self.spent = np.concatenate([c.spent for c in chains])
        self.slope = np.concatenate([c.slope_in for c in chains])
        self.up = np.concatenate([c.up + off for c, off in zip(chains, offsets)], axis=1)
        self.log_cap = np.tile(np.concatenate([[-np.inf], LOG_RATIO_GRID]), len(chains))
        self.tau, self.count = tau, count
        self.scale = tau / weight  # p = lam * scale
        # The last grid point whose cap fits the context limit (0: none fits, cap 0).
        m = np.searchsorted(LOG_RATIO_GRID, np.log(min(t_max, 2.0**24) / tau), side="right")
        self.top = offsets[hist_of_type] + m

    def vertex(self, log_price: float) -> np.ndarray:
        """Each type's hull vertex (a flat index) at ln lam = log_price."""
        p = math.exp(log_price) * self.scale
        v = self.top.copy()
        bad = self.slope[v] <= p  # the edge into v is not worth its price: move towards the origin
        for j in range(_LEVELS - 1, -1, -1):
            w = self.up[j][v]
            move = bad & (self.slope[w] <= p)
            v = np.where(move, w, v)
        return np.where(bad, self.up[0][v], v)

    def caps(self, vertex: np.ndarray) -> np.ndarray:
        """Integer caps of the types at these vertices (0 at the origin)."""
        log_cap = self.log_cap[vertex]
        finite = np.isfinite(log_cap)
        return np.where(finite, floor_caps(self.tau * np.exp(np.where(finite, log_cap, 0.0))), 0)

    def cost_at_limit(self, t_max: float) -> np.ndarray:
        """Cost per query of each type with the context limit itself as its cap."""
        limit = min(t_max, 2.0**24)
        expected = self.tau * self.spent[self.top] + limit * (1.0 - self.done[self.top])
        return (1.0 - self.theta) * expected + self.theta * limit

    def total(self, log_price: float) -> float:
        return float(np.dot(self.count * self.tau, self.cost[self.vertex(log_price)]))

    def bracket(self) -> tuple[float, float]:
        """ln lam where every type takes its top vertex, and where every type abandons."""
        finite = self.slope[np.isfinite(self.slope)]
        hi_p = max(float(finite.max()), 1e-12) if finite.size else 1.0
        lo_p = float(finite[finite > 0].min()) if (finite > 0).any() else 1e-12
        lo = math.log(lo_p) - math.log(float(self.scale.max())) - 1.0
        hi = math.log(hi_p) - math.log(float(self.scale.min())) + 1.0
        return lo, hi


def expected_generated_empirical(caps, thresholds, lengths: EmpiricalLengths) -> np.ndarray:
    """E[min(D, cap)] per query under its histogram (finished samples costed at their cell's upper edge)."""
    caps = np.asarray(caps, dtype=float)
    tau = np.maximum(np.asarray(thresholds, dtype=float), 1.0)
    out = np.zeros(caps.size)
    for i, (c, t, k) in enumerate(zip(caps, tau, np.asarray(lengths.which))):
        if c <= 0:
            continue
        h = lengths.histograms[int(k)]
        mass = h.finished
        lengths_k = t * np.exp(LOG_RATIO_GRID)
        done = lengths_k <= c
        out[i] = float((mass[done] * lengths_k[done]).sum() + c * (1.0 - mass[done].sum()))
    return out


def checked_length_bins(bins, n_histograms: int) -> np.ndarray:
    """Length bins as integer indices into ``n_histograms`` histograms; anything else (a fraction, NaN, out
    of range, a bool) is refused. Shared by the market, its quotes and the ingress's lease market."""
    raw = np.asarray(bins, dtype=object).reshape(-1)
    if any(isinstance(b, (bool, np.bool_)) for b in raw):
        raise InvalidInputError("length_bin", raw.tolist()[:4], f"needs an index into {n_histograms} histograms")
    try:
        which = raw.astype(float)
    except (TypeError, ValueError):
        raise InvalidInputError("length_bin", raw.tolist()[:4], "needs integer indices") from None
    if which.size and (not np.all(np.isfinite(which)) or (which != np.rint(which)).any() or which.min() < 0
                       or which.max() >= n_histograms):
        raise InvalidInputError("length_bin", which.tolist()[:4], f"needs an index into {n_histograms} histograms")
    return which.astype(np.int64)


def _checked_lengths_and_weights(tau: np.ndarray, lengths: EmpiricalLengths, weights) -> tuple[np.ndarray, np.ndarray]:
    """Each query's histogram index and tenant weight (1 when ``weights`` is None), checked."""
    which = np.asarray(lengths.which, dtype=np.int64)
    if which.shape != tau.shape or (tau.size and (which.min() < 0 or which.max() >= len(lengths.histograms))):
        raise InvalidInputError("lengths.which", which.shape, f"needs one histogram index per query {tau.shape}")
    w = np.ones_like(tau) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)
    if (~np.isfinite(w) | (w <= 0)).any():
        raise InvalidInputError("weights", weights, "must be finite and > 0")
    return which, w


def clear_empirical_market(
    thresholds,
    budget,
    *,
    lengths: EmpiricalLengths,
    weights=None,
    context_limit_tokens: float | None = None,
    cap_budget: float | None = None,
    mean_cap_budget: float | None = None,
    share_hint: float | None = None,
) -> ConsumptionResult:
    """Clear a budget of expected generated tokens with each query's empirical length distribution.

    ``thresholds`` are the predictions the histograms are relative to (raw,
    not calibrated: the histogram carries the bias); ``lengths`` gives each
    query's histogram; ``weights`` are tenant weights (``None``: 1);
    ``cap_budget``, when given, also bounds the sum of the caps (the tokens
    reserved while they are in flight; module docstring); ``mean_cap_budget``
    bounds their mean over the admitted queries instead (what each open
    reservation may hold): the sum of caps is then bounded by that mean times
    the queries admitted without it; ``share_hint`` is a reservation share to
    try first (the last clearing's ``theta``): the search then starts at it
    and its neighbour instead of bisecting the whole grid (the same share
    wherever the sum of caps falls as ``theta`` grows). The result's
    ``shadow_price`` is the price of an expected generated token and
    ``reservation_price`` that of a reserved one (0 when the caps fit).
    """
    tau = np.maximum(validate_thresholds(thresholds), 1.0)
    b = validate_budget(budget)
    t_max = validate_context_limit(context_limit_tokens)
    which, w = _checked_lengths_and_weights(tau, lengths, weights)
    if cap_budget is not None:
        cap_budget = validate_budget(cap_budget)
    if tau.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ConsumptionResult(empty, 0.0, empty.astype(bool), 0.0, b, 0, True, 0)
    # Types: equal (histogram, rounded threshold, weight).
    ltau = np.rint(np.log(tau) / LOG_TAU_STEP).astype(np.int64)
    wvals, wcode = _codes(np.asarray(w, dtype=float))
    key = np.stack([which, ltau, wcode])
    keys, inverse, count = np.unique(key, axis=1, return_inverse=True, return_counts=True)
    types = _Types(keys, inverse.reshape(-1), count.astype(float), wvals[keys[2]])
    res = _clear(types, lengths, b, t_max, 0.0)
    if mean_cap_budget is not None:
        admitted = int((res.caps > 0).sum())
        bound = validate_budget(mean_cap_budget) * admitted
        cap_budget = bound if cap_budget is None else min(cap_budget, bound)
    if cap_budget is None or res.caps.sum() <= cap_budget:
        return res
    # The caps do not fit their budget: the smallest reservation share on the grid whose caps do.
    top = RESERVATION_SHARES.size - 1
    cache: dict[int, ConsumptionResult] = {}

    def trial(k: int) -> ConsumptionResult:
        if k not in cache:
            theta = float(RESERVATION_SHARES[k])
            cache[k] = _clear(types, lengths, (1.0 - theta) * b + theta * cap_budget, t_max, theta)
        return cache[k]

    def fits(k: int) -> bool:
        return k == top or trial(k).caps.sum() <= cap_budget  # theta = 1 clears the caps alone: always fits

    lo, hi = 0, top  # lo does not fit, hi does
    if share_hint is not None:  # the last clearing's share: the price moves little between two requests
        k = int(np.clip(np.searchsorted(RESERVATION_SHARES, share_hint - 1e-9), 1, top))
        if fits(k):
            hi = k
            if k > 1 and not fits(k - 1):
                lo = k - 1
        else:
            lo = k
    best = trial(bisect_integer(fits, lo, hi))
    iterations = res.iterations + sum(r.iterations for r in cache.values())
    return dataclasses.replace(best, budget=b, iterations=iterations)


def caps_at_log_price_empirical(thresholds, *, lengths: EmpiricalLengths, log_price: float, full_context: bool,
                                weights=None, context_limit_tokens: float | None = None,
                                reservation_share: float = 0.0) -> np.ndarray:
    """Each query's best response at the price ``exp(log_price)`` of an expected generated token: its cap on
    the market's grid, 0 when insolvent (a price quote; :mod:`clear_core.quotes`). ``full_context``: the
    budget is abundant, every query gets the context limit. A query of the clearing that set the price gets
    back its cap there, except a marginal query the clearing upgraded with the budget its last jump left.

    ``reservation_share`` ``theta`` > 0: the clearing had a second budget, on the caps (module docstring),
    and ``exp(log_price)`` is its price ``nu`` on the combined cost ``(1 - theta) C + theta cap``: the
    best response to ``lam = nu (1 - theta)`` per expected generated token and ``mu = nu theta`` per
    reserved one."""
    tau = np.maximum(validate_thresholds(thresholds), 1.0)
    t_max = validate_context_limit(context_limit_tokens)
    theta = float(reservation_share)
    if not 0.0 <= theta <= 1.0:
        raise InvalidInputError("reservation_share", reservation_share, "must be in [0, 1]")
    if full_context:
        return np.full(tau.size, int(min(t_max, 2.0**24)), dtype=np.int64)
    which, w = _checked_lengths_and_weights(tau, lengths, weights)
    if tau.size == 0:
        return np.zeros(0, dtype=np.int64)
    used, hist_code = np.unique(which, return_inverse=True)
    t_tau = np.exp(np.rint(np.log(tau) / LOG_TAU_STEP) * LOG_TAU_STEP)  # the market's rounded thresholds
    demand = _Demand([_chain(lengths.histograms[int(i)], theta) for i in used], hist_code.reshape(-1), t_tau, w,
                     np.ones(tau.size), t_max, theta)
    return demand.caps(demand.vertex(float(log_price)))


@dataclass(frozen=True)
class _Types:
    """Queries grouped by (histogram, rounded threshold, weight)."""

    keys: np.ndarray  # [3, types]: histogram index, ln threshold / LOG_TAU_STEP, weight code
    inverse: np.ndarray  # query -> type
    count: np.ndarray  # queries per type
    weight: np.ndarray  # per type


def _clear(types: _Types, lengths: EmpiricalLengths, b: float, t_max: float, theta: float) -> ConsumptionResult:
    """The one-budget market on the cost ``(1 - theta) C + theta cap`` (module docstring)."""
    keys, inverse, count = types.keys, types.inverse, types.count
    used, hist_code = np.unique(keys[0], return_inverse=True)
    theta = float(theta)
    chains = [_chain(lengths.histograms[int(i)], theta) for i in used]
    t_tau = np.exp(keys[1] * LOG_TAU_STEP)
    demand = _Demand(chains, hist_code, t_tau, types.weight, count, t_max, theta)
    # Expected generated tokens per unit of threshold at each vertex (the combined cost's theta = 0 part).
    expected_cost = demand.cost if theta == 0.0 else np.concatenate(
        [_chain(lengths.histograms[int(i)]).cost for i in used])
    lo, hi = demand.bracket()
    probes, converged = 0, True
    f_lo = demand.total(lo) - b
    at_limit = demand.cost_at_limit(t_max)
    n = inverse.size
    if float(np.dot(count, at_limit)) <= b:  # abundant: every query gets the context limit
        caps = np.full(n, int(min(t_max, 2.0**24)), dtype=np.int64)
        expected = float(np.dot(count, _Demand(
            [_chain(lengths.histograms[int(i)]) for i in used], hist_code, t_tau, types.weight, count, t_max,
        ).cost_at_limit(t_max)))
        return ConsumptionResult(caps=caps, shadow_price=0.0, active=caps > 0, expected_generated_tokens=expected,
                                 budget=b, iterations=0, converged=True, n_types=int(count.size), full_context=True)
    if f_lo <= 0:  # every cap worth anything fits at a vanishing price
        log_price, price = -math.inf, 0.0
        vertex = demand.vertex(lo)
        upgrade = None
    else:
        log_price, probes, converged = log_price_boundary(lambda l: demand.total(l) - b, lo, hi, f_lo, demand.total(hi) - b)
        price = math.exp(log_price)
        vertex = demand.vertex(log_price)
        upgrade = demand.vertex(log_price - 2 * 1e-7)  # the vertices just below the clearing price
    type_caps = demand.caps(vertex)
    caps = type_caps[inverse]
    spent = float(np.dot(count * t_tau, demand.cost[vertex]))
    expected = float(np.dot(count * t_tau, expected_cost[vertex]))
    if upgrade is not None:
        # The budget the last jump left: upgrade as many marginal queries as it covers, in order.
        spare = b - spent
        changed = np.flatnonzero(upgrade != vertex)
        for t in changed:
            each = t_tau[t] * (demand.cost[upgrade[t]] - demand.cost[vertex[t]])
            k = int(min(count[t], spare // each)) if each > 0 else 0
            if k < 1:
                continue
            caps[np.flatnonzero(inverse == t)[:k]] = demand.caps(upgrade)[t]
            spare -= k * each
            expected += k * t_tau[t] * (expected_cost[upgrade[t]] - expected_cost[vertex[t]])
    active = caps > 0
    return ConsumptionResult(caps=caps, shadow_price=float(price) * (1.0 - theta), active=active,
                             expected_generated_tokens=expected, budget=b, iterations=probes,
                             converged=bool(converged), n_types=int(count.size),
                             reservation_price=float(price) * theta, log_price=float(log_price),
                             log_fill_price=float(log_price), reservation_share=theta)
