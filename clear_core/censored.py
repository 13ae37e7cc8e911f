"""Lengths the service only partly sees: fitting right-censored log lengths.

A request the service admits either ends by itself, and shows its length
``d``, or stops at its cap ``c``, and shows only that ``d > c`` (its length is
*right-censored* at the cap). Lengths observed this way are not a sample of
the lengths requests need: the long ones are exactly those that hit their
caps. A refit that takes a capped request's cap for its length pulls the
predictions down; lower predictions give lower caps, lower caps censor more,
and the model spirals down (``tests/unit/core/test_censored.py`` runs that loop).

The models here use a censored request for what it says, a lower bound:

* :func:`fit_censored_ridge`: the Tobit model (type I, right-censored) of a log
  length linear in features, ``ln d = x . beta + b + eps``, ``eps ~ N(0, sigma^2)``,
  each observation censored at its own cap. Its log-likelihood is
  ``sum_finished [log phi(z) - log sigma] + sum_capped log(1 - Phi(z))`` with
  ``z = (ln y - x . beta - b) / sigma``; a ridge penalty pulls ``(beta, b)``
  towards a prior (the shipped head), so a few observations move it a little
  and many move it far. Fitted by L-BFGS with the analytic gradient. With
  ``x`` empty it is a censored normal location and scale (a calibration bin's
  bias and spread).
* :func:`kaplan_meier`: the distribution of a censored quantity without a
  model (the product-limit estimate; per bin, the length histograms the
  empirical market prices). What lies beyond the last finished observation is
  left as mass at infinity: it is not seen, only bounded below.

Only numpy and scipy (the core's layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_ndtr

from clear_core.errors import InvalidInputError

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)
#: Bounds on the fitted log spread (a spread of e^-5 to e^3 in log length).
LOG_SIGMA_BOUNDS = (-5.0, 3.0)


@dataclass(frozen=True)
class CensoredFit:
    """A fitted Tobit model of log length."""

    coef: np.ndarray  # (k,) feature weights (empty for a location-scale fit)
    intercept: float
    sigma: float  # spread of log length around the fitted mean
    n: int  # observations
    n_censored: int  # of which stopped at their caps
    log_likelihood: float  # per observation, at the fit
    converged: bool

    def mean_log(self, features) -> np.ndarray:
        """The fitted mean log length of each row of ``features`` (the median length's log)."""
        x = np.atleast_2d(np.asarray(features, dtype=float)) if self.coef.size else np.zeros((len(features), 0))
        return x @ self.coef + self.intercept


def _checked(features, log_y, censored, weights):
    y = np.asarray(log_y, dtype=float).ravel()
    n = y.size
    x = np.zeros((n, 0)) if features is None else np.asarray(features, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    cens = np.asarray(censored, dtype=bool).ravel()
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float).ravel()
    if x.shape[0] != n or cens.size != n or w.size != n:
        raise InvalidInputError("features", x.shape, f"rows must match {n} log lengths, censor flags and weights")
    if n == 0:
        raise InvalidInputError("log_y", n, "needs at least one observation")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x)) and np.all(np.isfinite(w)) and np.all(w >= 0)):
        raise InvalidInputError("log_y", "non-finite", "log lengths, features and weights must be finite, weights >= 0")
    return x, y, cens, w


def censored_log_likelihood(features, log_y, censored, coef, intercept: float, sigma: float,
                            weights=None) -> np.ndarray:
    """Each observation's log-likelihood under a Tobit model (finished: the density of its log length;
    capped: the probability of exceeding its cap). The held-out score a candidate model is judged by."""
    x, y, cens, _ = _checked(features, log_y, censored, weights)
    mu = x @ np.asarray(coef, dtype=float).reshape(-1) + float(intercept) if x.shape[1] else np.full(y.size, float(intercept))
    z = (y - mu) / float(sigma)
    return np.where(cens, log_ndtr(-z), -0.5 * z * z - np.log(sigma) - _HALF_LOG_2PI)


def fit_censored_ridge(features, log_y, censored, *, prior_coef=None, prior_intercept: float | None = None,
                       alpha: float = 0.0, weights=None, init_sigma: float | None = None,
                       max_iter: int = 500) -> CensoredFit:
    """The penalised maximum-likelihood Tobit fit of ``log_y`` on ``features`` (module docstring).

    ``log_y``: the log length of a finished request, the log cap of a capped one (``censored``).
    ``alpha``: the penalty ``alpha / 2 * (|beta - beta0|^2 + (b - b0)^2)`` towards the prior
    ``(prior_coef, prior_intercept)`` (zeros and no intercept penalty when not given), in the units of
    the log-likelihood (one observation weighs ``1 / sigma^2`` against it). ``weights``: per observation.
    """
    x, y, cens, w = _checked(features, log_y, censored, weights)
    n, k = x.shape
    beta0 = np.zeros(k) if prior_coef is None else np.asarray(prior_coef, dtype=float).reshape(-1)
    if beta0.size != k:
        raise InvalidInputError("prior_coef", beta0.size, f"must have one weight per feature ({k})")
    if alpha < 0 or not np.isfinite(alpha):
        raise InvalidInputError("alpha", alpha, "must be finite and >= 0")
    fin = ~cens
    b0 = float(prior_intercept) if prior_intercept is not None else None
    start_b = b0 if b0 is not None else float(np.average(y, weights=w + 1e-12))
    spread = float(np.sqrt(np.average((y - start_b) ** 2, weights=w + 1e-12))) if n > 1 else 1.0
    s0 = float(init_sigma) if init_sigma is not None else max(spread, 0.1)
    theta0 = np.concatenate([beta0, [start_b, np.log(s0)]])
    total_w = float(w.sum()) or 1.0

    def objective(theta):
        beta, b, log_s = theta[:k], theta[k], theta[k + 1]
        s = np.exp(log_s)
        mu = x @ beta + b if k else np.full(n, b)
        z = (y - mu) / s
        ll = np.empty(n)
        g_mu = np.empty(n)  # d ll / d mu
        g_ls = np.empty(n)  # d ll / d log sigma
        zf = z[fin]
        ll[fin] = -0.5 * zf * zf - log_s - _HALF_LOG_2PI
        g_mu[fin] = zf / s
        g_ls[fin] = zf * zf - 1.0
        zc = z[cens]
        log_sf = log_ndtr(-zc)
        ll[cens] = log_sf
        mills = np.exp(-0.5 * zc * zc - _HALF_LOG_2PI - log_sf)  # phi(z) / (1 - Phi(z))
        g_mu[cens] = mills / s
        g_ls[cens] = mills * zc
        f = -float(w @ ll)
        grad = np.empty(k + 2)
        grad[:k] = -(x.T @ (w * g_mu)) if k else grad[:k]
        grad[k] = -float(w @ g_mu)
        grad[k + 1] = -float(w @ g_ls)
        if alpha > 0:
            d = beta - beta0
            f += 0.5 * alpha * float(d @ d)
            grad[:k] += alpha * d
            if b0 is not None:
                f += 0.5 * alpha * (b - b0) ** 2
                grad[k] += alpha * (b - b0)
        return f / total_w, grad / total_w

    bounds = [(None, None)] * (k + 1) + [LOG_SIGMA_BOUNDS]
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-13})
    beta, b, s = res.x[:k], float(res.x[k]), float(np.exp(res.x[k + 1]))
    ll = censored_log_likelihood(x, y, cens, beta, b, s)
    return CensoredFit(coef=np.array(beta), intercept=b, sigma=s, n=n, n_censored=int(cens.sum()),
                       log_likelihood=float(np.average(ll, weights=w + 1e-12)), converged=bool(res.success))


def kaplan_meier(values, censored, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """The product-limit estimate of ``P(V > v)`` from right-censored ``values``.

    Returns ``(times, survival)``: the distinct finished values, ascending, and the estimated
    survival just after each. A censored value at a time counts as still at risk there (ties:
    events before censorings). The mass ``survival[-1]`` is left beyond the last finished value.
    """
    v = np.asarray(values, dtype=float).ravel()
    cens = np.asarray(censored, dtype=bool).ravel()
    w = np.ones(v.size) if weights is None else np.asarray(weights, dtype=float).ravel()
    if cens.size != v.size or w.size != v.size:
        raise InvalidInputError("censored", cens.size, f"must match {v.size} values")
    if not (np.all(np.isfinite(v)) and np.all(w >= 0)):
        raise InvalidInputError("values", "non-finite", "values must be finite and weights >= 0")
    times = np.unique(v[~cens])
    if times.size == 0:
        return times, times.astype(float)
    # at risk at t: weight of values >= t; events at t: weight of finished values == t
    order = np.argsort(v, kind="stable")
    sv, sw = v[order], w[order]
    at_risk = sw.sum() - np.concatenate([[0.0], np.cumsum(sw)])[np.searchsorted(sv, times, side="left")]
    finished_w = np.bincount(np.searchsorted(times, v[~cens]), weights=w[~cens], minlength=times.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.where(at_risk > 0, 1.0 - finished_w / at_risk, 1.0)
    return times, np.cumprod(step)
