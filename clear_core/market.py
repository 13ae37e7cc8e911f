"""Market clearing: the shadow price of a token and every query's cap (Sec. 5.2).

Public entry point: :func:`clear_market`. Three methods share one contract:

``bisection``
    The paper's Algorithm 1 as written: bisect the price on ``[0, alpha]``
    (40 iterations, tolerance 1e-6), evaluating every query's Lambert-W
    allocation and its surplus at every probe, keep the feasible side.
    ``O(N)`` Lambert-W evaluations per probe. Kept as the reference.
``exact``
    The same market-clearing price and active set, exploiting the structure
    of global (alpha, beta): solvent queries share one slack ``x(lam)`` and the
    active set is the ``k`` easiest. Sorting once and prefix sums turn demand
    at the insolvency price of each query into a vector, a binary search picks
    the active set, and the price inside that segment has a closed form.
    ``O(N log N)`` overall, one scalar Lambert W.
``optimal``
    The true maximiser of Eq. 2. The utilities are not concave, so the
    Lagrangian (clearing) answer can be far from the optimum of the paper's own
    objective. The optimum admits the ``k`` easiest queries with a common
    (water-filled) slack; enumerating ``k`` over prefix sums finds it.

Unused budget. ``D(lam)`` jumps down whenever a query turns insolvent, so the
clearing price may leave part of the budget unspent. With ``fill_unused=True``
(the default) the solver shares that remainder among the active queries as
extra common slack, never beyond their peak ``tau + peak_slack`` nor the
context limit; the reported shadow price stays the clearing price. With
``fill_unused=False`` the remainder is left unspent exactly as the paper does.

Caps are integer tokens (:func:`clear_core.numerics.integer_caps`): real caps
are floored (so they never exceed the budget) and, when filling, the rounding
remainder goes to the largest fractional parts.

Each method is a *solver* in :data:`SOLVERS` with one signature,
``(curve, tau, budget, t_max) -> Clearing``; :func:`clear_market` validates the
inputs, runs the solver, fills and rounds, whatever the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.numerics import bisect_monotone, integer_caps
from clear_core.utility import UtilityCurve, make_utility

#: Algorithm 1's search budget and stopping tolerance (Table 5).
BISECTION_ITERATIONS = 40
BISECTION_TOLERANCE = 1e-6
#: Water-filling by bisection (the optimum's prefixes cut by the context limit): tolerance and cap.
WATER_FILL_TOLERANCE_TOKENS = 1e-9
WATER_FILL_ITERATIONS = 100
#: Floor of the adaptive slack 1/beta, in tokens (Eq. 16 reconstructed).
DEFAULT_MIN_SLACK_TOKENS = 16.0
#: Relative slack when comparing a demand with the budget. The adaptive beta
#: makes sum(tau + 1/beta) equal B exactly, so demand == budget is a common case
#: that summation order must not flip.
BUDGET_RTOL = 1e-12


def _within(demand, budget: float):
    return demand <= budget + BUDGET_RTOL * max(budget, 1.0)


@dataclass(frozen=True)
class MarketResult:
    """Outcome of one market clearing."""

    caps: np.ndarray  # query -> integer completion cap in tokens (0 = abandoned)
    shadow_price: float  # lambda*: marginal utility of one more token of budget
    active: np.ndarray  # query -> solvent (admitted) at the clearing price
    iterations: int  # price probes (bisection) or search steps (exact/optimal)
    slack_tokens: float  # common slack x(lambda*) of active queries before filling (log-normal: mean cap - tau)
    beta: float  # decay rate used (adaptive or given); nan for curves without one
    alpha: float  # initial velocity used; nan for curves without one
    method: str  # the solver: "exact", "bisection", "optimal" or "lognormal"
    budget: float  # the budget B that was cleared, in tokens
    converged: bool  # the solver met its tolerance (closed-form solvers: always)
    # Log-normal market: the price the active queries' caps were set at after filling (<= shadow_price;
    # see clear_core.uncertainty.caps_at_prices); nan for the other solvers.
    fill_price: float = math.nan

    @property
    def allocated_tokens(self) -> int:
        return int(self.caps.sum())

    @property
    def unused_tokens(self) -> float:
        return float(self.budget - self.caps.sum())

    @property
    def abandonment_rate(self) -> float:
        n = self.caps.size
        return float((~self.active).sum() / n) if n else 0.0


@dataclass(frozen=True)
class Clearing:
    """What a solver returns, before filling and integer rounding."""

    price: float  # the clearing (shadow) price
    active: np.ndarray  # query -> solvent
    real_caps: np.ndarray  # query -> real-valued cap, 0 where insolvent
    slack: float  # common slack of the active queries
    iterations: int  # probes or search steps
    converged: bool  # met its tolerance
    active_sorted: np.ndarray | None = None  # sorted thresholds of the active queries, when the solver has them


def validate_thresholds(thresholds) -> np.ndarray:
    """Return thresholds as a float array or raise naming the first bad value."""
    arr = np.asarray(thresholds, dtype=float)
    if arr.ndim != 1:
        raise InvalidInputError("thresholds", f"shape {arr.shape}", "must be a 1-D sequence")
    bad = ~np.isfinite(arr) | (arr < 0.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"thresholds[{i}]", float(arr[i]), "must be finite and >= 0")
    return arr


def validate_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise InvalidInputError("budget", budget, "must be a number of tokens") from None
    if not math.isfinite(b) or b < 0.0:
        raise InvalidInputError("budget", budget, "must be finite and >= 0")
    return b


def validate_context_limit(context_limit_tokens) -> float:
    """The context limit ``t_max`` as a float (``inf`` for ``None``)."""
    if context_limit_tokens is None:
        return math.inf
    m = float(context_limit_tokens)
    if math.isnan(m) or m <= 0:
        raise InvalidInputError("context_limit_tokens", context_limit_tokens, "must be > 0")
    return m


def adaptive_beta(
    thresholds: np.ndarray, budget: float, min_slack_tokens: float = DEFAULT_MIN_SLACK_TOKENS
) -> float:
    """Eq. 16 (reconstructed): ``beta = 1 / max(B/N - mean(tau), min_slack)``.

    The characteristic slack ``1/beta`` is the per-query surplus of budget over
    the mean predicted threshold: loose budgets buy long surges (small beta),
    tight ones short slack (large beta).
    """
    if thresholds.size == 0:
        return 1.0 / min_slack_tokens
    surplus = budget / thresholds.size - float(thresholds.mean())
    return 1.0 / max(surplus, min_slack_tokens)


def clear_market(
    thresholds,
    budget,
    *,
    alpha: float = 2.0,
    beta: float | None = None,
    context_limit_tokens: float | None = None,
    method: str = "exact",
    utility: str = "surge",
    fill_unused: bool = True,
    min_slack_tokens: float = DEFAULT_MIN_SLACK_TOKENS,
) -> MarketResult:
    """Find the shadow price that clears ``budget`` and every query's cap.

    Parameters
    ----------
    thresholds : predicted emergence thresholds ``tau_i`` in tokens (>= 0).
    budget : total completion-token budget ``B`` of the batch.
    alpha : initial velocity (the reservation price); caps are invariant to it.
    beta : decay rate; ``None`` uses the adaptive rule (Eq. 16).
    context_limit_tokens : ``t_max``; queries with ``tau >= t_max`` can never
        reach their threshold and are abandoned.
    method : a solver of :data:`SOLVERS`: ``exact`` (default), ``bisection``
        (paper reference) or ``optimal``.
    utility : ``surge`` (Eq. 1), ``triangular`` or ``quadratic`` (Sec. 7.4).
    fill_unused : share the budget the clearing leaves unused (module docstring).
    min_slack_tokens : floor of ``1/beta`` for the adaptive rule.
    """
    tau = validate_thresholds(thresholds)
    b = validate_budget(budget)
    t_max = validate_context_limit(context_limit_tokens)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InvalidInputError("alpha", alpha, "must be finite and > 0")
    if beta is None:
        beta = adaptive_beta(tau, b, min_slack_tokens)
    elif not (math.isfinite(beta) and beta > 0):
        raise InvalidInputError("beta", beta, "must be finite and > 0")
    if method not in SOLVERS:
        raise InvalidInputError("method", method, f"expected one of {METHODS}")
    curve = make_utility(utility, alpha, beta)

    cleared = SOLVERS[method](curve, tau, b, t_max)
    real_caps = cleared.real_caps
    limit = None
    if fill_unused and cleared.active.any():
        active_sorted = cleared.active_sorted
        if active_sorted is None:
            active_sorted = np.sort(tau[cleared.active])
        real_caps = _fill(curve, tau, cleared.active, active_sorted, real_caps, b, t_max)
        # Whole tokens the rounding leaves over: up to each query's peak and the context limit.
        limit = np.minimum(tau + curve.peak_slack, t_max)
    return MarketResult(
        caps=integer_caps(real_caps, b, limit=limit),
        shadow_price=float(cleared.price),
        active=cleared.active,
        iterations=int(cleared.iterations),
        slack_tokens=float(cleared.slack),
        beta=float(beta),
        alpha=float(alpha),
        method=method,
        budget=b,
        converged=bool(cleared.converged),
    )


def _common_slack_caps(tau: np.ndarray, active: np.ndarray, slack: float, t_max: float) -> np.ndarray:
    real_caps = np.zeros(tau.size)
    real_caps[active] = np.minimum(tau[active] + slack, t_max)
    return real_caps


# --------------------------------------------------------------------------
# The paper's bisection (reference)
# --------------------------------------------------------------------------


def _demand_per_query(curve: UtilityCurve, tau: np.ndarray, lam: float, t_max: float) -> np.ndarray:
    """Algorithm 1's candidate evaluation, query by query.

    (1) the unconstrained surge length from the Lambert-W policy (one
    evaluation per query, as the paper does); (2) rational abandonment where
    the surplus is not positive; (3) the context limit.
    """
    lam_q = np.full(tau.shape, lam)
    x = curve.slack(lam_q)  # per-query Lambert W
    t = tau + x
    surplus = curve.gain(x) - lam_q * t
    solvent = (surplus > 0.0) & (tau < t_max)
    return np.where(solvent, np.minimum(t, t_max), 0.0)


def _solve_bisection(curve: UtilityCurve, tau: np.ndarray, budget: float, t_max: float) -> Clearing:
    """Algorithm 1: bisect the price on ``[0, alpha]``, keep the feasible side."""
    caps = _demand_per_query(curve, tau, 0.0, t_max)
    if _within(caps.sum(), budget):  # abundant budget: everyone at the peak
        price, iterations, converged = 0.0, 1, True
    else:
        search = bisect_monotone(
            lambda lam: not _within(_demand_per_query(curve, tau, lam, t_max).sum(), budget),
            0.0,
            curve.max_price,
            tolerance=BISECTION_TOLERANCE,
            max_iterations=BISECTION_ITERATIONS,
        )
        price, iterations, converged = search.hi, search.iterations, search.converged
        caps = _demand_per_query(curve, tau, price, t_max)
    active = caps > 0
    slack = float(curve.slack(price)) if active.any() else 0.0
    return Clearing(price, active, caps, slack, iterations, converged)


# --------------------------------------------------------------------------
# Exact clearing on sorted thresholds
# --------------------------------------------------------------------------


def _clipped_sum(s: np.ndarray, prefix: np.ndarray, k: np.ndarray, x: np.ndarray, t_max: float):
    """sum_{i<k} min(s_i + x, t_max) for sorted ``s``, vectorised over (k, x)."""
    if math.isinf(t_max):
        return prefix[k] + k * x
    m = np.minimum(k, np.searchsorted(s, t_max - x, side="left"))
    return prefix[m] + m * x + (k - m) * t_max


def water_fill(s: np.ndarray, prefix: np.ndarray, k: int, budget: float, t_max: float) -> float:
    """The common slack x with ``sum_{i<k} min(s_i + x, t_max) = budget`` (inf if never reached).

    ``s`` is sorted; the queries that hit the context limit first are the
    largest. Demand at the breakpoint ``x = t_max - s_j`` is
    ``P[j] + j (t_max - s_j) + (k - j) t_max``; locate the segment, solve linearly.
    """
    if k == 0:
        return math.inf
    if math.isinf(t_max):
        return (budget - prefix[k]) / k
    if k * t_max <= budget:
        return math.inf
    j = np.arange(k, 0, -1)  # j = k..1: breakpoint where queries j..k-1 are clipped
    x_break = t_max - s[j - 1]
    demand = prefix[j - 1] + (j - 1) * x_break + (k - j + 1) * t_max
    # demand at x_break[idx] with the (j-1)th query just reaching t_max; increasing in idx.
    idx = int(np.searchsorted(demand, budget, side="right"))
    # Below breakpoint idx the unclipped count is j = k - idx.
    m = k - idx
    return (budget - (k - m) * t_max - prefix[m]) / m


def _solve_exact(curve: UtilityCurve, tau: np.ndarray, budget: float, t_max: float) -> Clearing:
    """Clearing price, active set and slack from sorted thresholds.

    Query ``i`` (sorted) turns insolvent at ``breaks[i] = price_at_threshold(s_i)``
    (non-increasing in ``i``). With exactly ``k`` active the price lies in
    ``[breaks[k], breaks[k-1])``; the least demand those ``k`` can have is at
    the top of that range, ``min_demand(k)``, non-decreasing in ``k``. The
    active set is the largest ``k`` whose least demand fits (a binary search of
    ``O(log N)`` scalar probes); the price inside its segment solves
    ``demand = budget`` in closed form (water-filling, then the inverse slack).
    """
    s_all = np.sort(tau)
    price, k, slack, iterations = _clear_sorted(curve, s_all, budget, t_max)
    # The k easiest are active; ties were resolved as whole groups.
    active = tau < (s_all[k] if k < s_all.size else t_max)
    return Clearing(price, active, _common_slack_caps(tau, active, slack, t_max), slack, iterations, True, s_all[:k])


def _clear_sorted(curve: UtilityCurve, s: np.ndarray, budget: float, t_max: float):
    eligible = int(np.searchsorted(s, t_max, side="left"))  # tau < t_max
    s = s[:eligible]
    prefix = np.concatenate(([0.0], np.cumsum(s)))
    n = s.size
    if n == 0:  # nobody can be served: no demand, so no scarcity
        return 0.0, 0, 0.0, 0
    cap = budget + BUDGET_RTOL * max(budget, 1.0)
    # Demand at price 0: everyone eligible at the peak.
    if _clipped_sum(s, prefix, n, curve.peak_slack, t_max) <= cap:
        return 0.0, n, curve.peak_slack, 1

    def min_demand(k: int) -> float:
        top_slack = float(curve.slack(curve.price_at_threshold(s[k - 1])))
        return float(_clipped_sum(s, prefix, k, top_slack, t_max))

    lo, hi, iterations = 0, n, 0  # invariant: min_demand(lo) <= cap < min_demand(hi + 1)
    while lo < hi:  # a binary search over integers (the active count), not a price bisection
        iterations += 1
        mid = (lo + hi + 1) // 2
        if min_demand(mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    # Equal thresholds turn insolvent at the same price: all of a tie group or none.
    if 0 < k < n and s[k - 1] == s[k]:
        k = int(np.searchsorted(s, s[k], side="left"))
    if k == 0:
        return float(curve.price_at_threshold(s[0])), 0, 0.0, iterations
    floor_price = float(curve.price_at_threshold(s[k])) if k < n else 0.0
    x_budget = water_fill(s, prefix, k, budget, t_max)
    price = max(floor_price, curve.price_at_slack(x_budget))
    slack = float(min(x_budget, curve.slack(price)))
    return price, k, slack, max(iterations, 1)


# --------------------------------------------------------------------------
# The optimum of Eq. 2
# --------------------------------------------------------------------------


def _solve_optimal(curve: UtilityCurve, tau: np.ndarray, budget: float, t_max: float) -> Clearing:
    """Maximise sum u_i(t_i) s.t. sum t_i <= B by enumerating the active count k.

    For a fixed active set the gain is concave up to the peak, so a common
    water-filled slack (capped at the peak) is optimal; for a fixed size the
    ``k`` easiest leave the most budget, so only prefixes need checking.
    """
    order = np.argsort(tau, kind="stable")
    price, k, slack, iterations, converged = _optimal_sorted(curve, tau[order], budget, t_max)
    active = np.zeros(tau.size, dtype=bool)
    active[order[:k]] = True
    real_caps = _common_slack_caps(tau, active, slack, t_max)
    return Clearing(price, active, real_caps, slack, iterations, converged, np.sort(tau[active]))


def _optimal_sorted(curve: UtilityCurve, s: np.ndarray, budget: float, t_max: float):
    eligible = int(np.searchsorted(s, t_max, side="left"))
    s = s[:eligible]
    n = s.size
    if n == 0:
        return 0.0, 0, 0.0, 0, True
    prefix = np.concatenate(([0.0], np.cumsum(s)))
    ks = np.arange(1, n + 1)
    feasible = prefix[ks] < budget  # need budget strictly above the thresholds
    ks = ks[feasible]
    if ks.size == 0:
        return curve.max_price, 0, 0.0, 1, True
    x = (budget - prefix[ks]) / ks  # unclipped common slack
    x = np.minimum(x, curve.peak_slack)
    converged = True
    if math.isinf(t_max):
        total = ks * curve.gain(x)
    else:
        clipped = s[ks - 1] + x > t_max
        if clipped.any():
            # The clipped prefixes' slack: demand sum min(s_i + x, t_max) = budget, x <= peak.
            search = bisect_monotone(
                lambda xs: _clipped_sum(s, prefix, ks[clipped], xs, t_max) <= budget,
                np.zeros(int(clipped.sum())),
                np.full(int(clipped.sum()), float(curve.peak_slack)),
                tolerance=WATER_FILL_TOLERANCE_TOKENS,
                max_iterations=WATER_FILL_ITERATIONS,
            )
            x[clipped] = search.lo
            converged = search.converged
        # sum_{i<k} g(min(x, t_max - s_i)): unclipped ones get g(x), the rest g(t_max - s_i).
        g_clip = np.concatenate(([0.0], np.cumsum(curve.gain(np.maximum(t_max - s, 0.0)))))
        m = np.minimum(ks, np.searchsorted(s, t_max - x, side="left"))
        total = m * curve.gain(x) + g_clip[ks] - g_clip[m]
    best = int(np.argmax(total))
    k = int(ks[best])
    slack = float(x[best])
    # The price that supports this allocation, for reporting: the marginal
    # utility of the common slack (0 at the peak).
    price = curve.price_at_slack(slack)
    return price, k, slack, int(ks.size), converged


#: The market's solvers, by ``method`` name; each ``(curve, tau, budget, t_max) -> Clearing``.
SOLVERS = {"exact": _solve_exact, "bisection": _solve_bisection, "optimal": _solve_optimal}
METHODS = tuple(SOLVERS)


# --------------------------------------------------------------------------
# Unused budget
# --------------------------------------------------------------------------


def _fill(curve, tau, active, s, real_caps, budget, t_max):
    """Share the budget the clearing left unused among active queries (module docstring).

    ``s`` holds the active thresholds, sorted.
    """
    spent = real_caps.sum()
    if spent >= budget:
        return real_caps
    prefix = np.concatenate(([0.0], np.cumsum(s)))
    x = min(water_fill(s, prefix, s.size, budget, t_max), curve.peak_slack)
    filled = np.minimum(tau + x, t_max)
    return np.where(active, np.maximum(filled, real_caps), 0.0)
