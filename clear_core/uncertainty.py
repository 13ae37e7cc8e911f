"""Market clearing when thresholds are predicted with log-normal error.

The paper's shifted surge treats the predicted threshold ``tau_hat`` as if it
were the true one. A real predictor is off by a multiplicative factor: the
true length is ``d = tau_hat * exp(sigma * eps)`` with ``eps ~ N(0, 1)`` and
``sigma`` the predictor's error in log space (its out-of-fold RMSE of
log-length). A cap ``c`` then finishes the query with probability

    p(c) = Phi(ln(c / tau_hat) / sigma)

which is itself an S-curve with the paper's three phases (Strict far below
``tau_hat``, Surge around it, Ample above), derived from the predictor's error
instead of assumed. CLEAR's market with this *expected* utility:

* each query maximises ``p(c) - lam c``. Writing ``c = tau_hat exp(sigma u)``,
  the first-order condition ``phi(u) / (sigma c) = lam`` becomes
  ``phi(u) exp(-sigma u) = kappa`` with ``kappa = lam sigma tau_hat``, whose
  upper (concave-side) root is closed form:
  ``u*(kappa) = -sigma + sqrt(sigma^2 - 2 ln(kappa sqrt(2 pi)))``;
* the surplus ``Phi(u*) - (kappa / sigma) exp(sigma u*)`` depends on ``kappa``
  only and falls with it, so a query is solvent iff ``kappa < kappa0(sigma)``,
  i.e. ``tau_hat < kappa0 / (lam sigma)``: the active set is still the easiest
  first, and rational abandonment falls out as before;
* the cap is a *multiple* of ``tau_hat`` that shrinks as the query gets
  costlier (``kappa`` grows): cheap queries buy high coverage, marginal ones
  low coverage. At a vanishing price every solvent query gets the context
  limit, since extra cap never lowers the chance of finishing.

Total demand is non-increasing in ``lam``; the clearing price is found by
bisection on ``log lam`` (vectorised, ``O(N)`` per probe). As ``sigma -> 0``
the utility tends to a step at ``tau_hat`` (caps -> thresholds); callers use
the paper's surge for exact thresholds.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr

from clear_core.errors import InvalidInputError
from clear_core.market import MarketResult, validate_budget, validate_context_limit, validate_thresholds
from clear_core.numerics import bisect_monotone, floor_caps, integer_caps

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Thresholds are floored at one token (log of 0 is undefined).
MIN_THRESHOLD_TOKENS = 1.0
#: Bisection on log(price): bracket, stopping width (relative price error ~1e-9) and iteration cap.
LOG_PRICE_BRACKET = (-60.0, 10.0)
LOG_PRICE_TOLERANCE = 1e-9
LOG_PRICE_ITERATIONS = 100


def optimal_coverage(kappa: np.ndarray, sigma: float) -> np.ndarray:
    """u*(kappa): cap = tau_hat * exp(sigma u*). -inf where no interior optimum exists."""
    kappa = np.asarray(kappa, dtype=float)
    with np.errstate(divide="ignore"):
        arg = sigma * sigma - 2.0 * np.log(kappa * _SQRT_2PI)
    return np.where(arg >= 0.0, -sigma + np.sqrt(np.maximum(arg, 0.0)), -np.inf)


@lru_cache(maxsize=256)
def solvency_kappa(sigma: float) -> float:
    """kappa0(sigma): the largest normalised price at which a query still has positive surplus."""

    def surplus(log_kappa: float) -> float:
        kappa = math.exp(log_kappa)
        u = float(optimal_coverage(kappa, sigma))
        if not math.isfinite(u):
            return -1.0
        return float(ndtr(u)) - kappa / sigma * math.exp(sigma * u)

    # The interior optimum exists while kappa <= exp(sigma^2/2)/sqrt(2 pi); the
    # surplus is positive for tiny kappa and negative at that bound.
    hi = sigma * sigma / 2.0 - math.log(_SQRT_2PI)
    return math.exp(brentq(surplus, -50.0, hi, xtol=1e-12))


def _caps_at(lam: float, tau: np.ndarray, sigma: float, t_max: float, kappa0: float) -> np.ndarray:
    """Every query's optimal cap at price ``lam`` (0 where insolvent)."""
    kappa = lam * sigma * tau
    u = optimal_coverage(kappa, sigma)
    caps = np.minimum(tau * np.exp(sigma * u), t_max)
    solvent = kappa < kappa0
    if math.isfinite(t_max):
        # A cap cut by the context limit may no longer pay back its cost.
        with np.errstate(divide="ignore"):
            p = ndtr(np.log(caps / tau) / sigma)
        solvent &= p - lam * caps > 0.0
    return np.where(solvent, caps, 0.0)


def clear_market_lognormal(
    thresholds,
    budget,
    *,
    log_sigma: float,
    context_limit_tokens: float | None = None,
    fill_unused: bool = True,
) -> MarketResult:
    """Clear the market on the expected utility ``Phi(ln(c / tau_hat) / sigma)``.

    Same result object as :func:`clear_core.market.clear_market`; ``beta`` and
    ``alpha`` are reported as nan (this curve has neither), ``slack_tokens``
    as the mean extra cap of active queries over their thresholds, and
    ``converged`` / ``iterations`` are those of the price bisection.
    """
    tau = np.maximum(validate_thresholds(thresholds), MIN_THRESHOLD_TOKENS)
    b = validate_budget(budget)
    t_max = validate_context_limit(context_limit_tokens)
    if not (math.isfinite(log_sigma) and log_sigma > 0):
        raise InvalidInputError("log_sigma", log_sigma, "must be finite and > 0")
    sigma = float(log_sigma)
    kappa0 = solvency_kappa(sigma)
    lo, hi = LOG_PRICE_BRACKET
    caps = _caps_at(math.exp(lo), tau, sigma, t_max, kappa0)
    iterations, converged, price = 0, True, 0.0
    fill_price = math.exp(lo)
    if caps.sum() > b:
        search = bisect_monotone(
            lambda log_lam: _caps_at(math.exp(log_lam), tau, sigma, t_max, kappa0).sum() > b,
            lo,
            hi,
            tolerance=LOG_PRICE_TOLERANCE,
            max_iterations=LOG_PRICE_ITERATIONS,
        )
        price, iterations, converged = math.exp(search.hi), search.iterations, search.converged
        caps = _caps_at(price, tau, sigma, t_max, kappa0)
        fill_price = price
    active = caps > 0
    if fill_unused and active.any() and b - caps.sum() >= 1.0:  # a jump left whole tokens over
        caps, fill_price = _fill_active(caps, active, tau, sigma, t_max, budget=b, price=price)
    slack = float((caps[active] - tau[active]).mean()) if active.any() else 0.0
    return MarketResult(
        caps=integer_caps(caps, b),
        shadow_price=float(price),
        active=active,
        iterations=iterations,
        slack_tokens=slack,
        beta=math.nan,
        alpha=math.nan,
        method="lognormal",
        budget=b,
        converged=converged,
        fill_price=float(fill_price),
    )


def caps_at_prices(thresholds, *, log_sigma: float, price: float, fill_price: float,
                   context_limit_tokens: float | None = None) -> np.ndarray:
    """Each query's cap at a quoted price, one query at a time (no clearing).

    Solvency is decided at ``price`` (> 0) and a solvent query's cap is its
    optimum at ``fill_price`` (<= ``price``), the two prices of a
    :func:`clear_market_lognormal` result (``shadow_price``, ``fill_price``;
    an abundant clearing quotes the bottom of the price bracket for both). A
    query of that batch gets its cap again (up to the integer rounding), a
    new one the cap it would have had in it.
    """
    tau = np.maximum(validate_thresholds(thresholds), MIN_THRESHOLD_TOKENS)
    t_max = validate_context_limit(context_limit_tokens)
    if not (math.isfinite(log_sigma) and log_sigma > 0):
        raise InvalidInputError("log_sigma", log_sigma, "must be finite and > 0")
    floor = math.exp(LOG_PRICE_BRACKET[0])
    price, fill_price = max(price, floor), max(min(fill_price, price), floor)
    sigma = float(log_sigma)
    caps = _caps_at(price, tau, sigma, t_max, solvency_kappa(sigma))
    kappa = fill_price * sigma * tau
    filled = np.minimum(tau * np.exp(sigma * optimal_coverage(kappa, sigma)), t_max)
    caps = np.where(caps > 0, np.maximum(caps, filled), 0.0)
    return floor_caps(caps)


def _fill_active(caps, active, tau, sigma, t_max, *, budget, price):
    """Spend what the abandonment jump left over on the active queries only.

    Lower the price seen by the active set (its membership frozen) until its
    demand meets the budget; nobody is admitted by this step.
    """
    t_act = tau[active]

    def demand(log_lam: float) -> np.ndarray:
        kappa = math.exp(log_lam) * sigma * t_act
        return np.minimum(t_act * np.exp(sigma * optimal_coverage(kappa, sigma)), t_max)

    lo = LOG_PRICE_BRACKET[0]
    fill_log = lo
    if demand(lo).sum() <= budget:
        best = demand(lo)
    else:
        search = bisect_monotone(
            lambda log_lam: demand(log_lam).sum() > budget,
            lo,
            math.log(price) if price > 0 else lo,
            tolerance=LOG_PRICE_TOLERANCE,
            max_iterations=LOG_PRICE_ITERATIONS,
        )
        best, fill_log = demand(search.hi), search.hi
    out = caps.copy()
    out[active] = np.maximum(best, caps[active])
    return out, math.exp(fill_log)
