"""Latent utility curves of a query as a function of its completion cap.

Every curve here is *shifted*: a query with emergence threshold ``tau`` gets
``u(t) = g(t - tau)`` for ``t > tau`` and 0 otherwise, where ``g`` is the same
for every query (the paper's model-intrinsic assumption: ``alpha`` and ``beta``
are global, only ``tau`` is per query). Three consequences drive the fast
solvers in :mod:`clear_core.market`:

* at a shadow price ``lam`` every solvent query buys the same *slack*
  ``x(lam)`` on top of its threshold (Shadow Price Parity, Eq. 3);
* a query is solvent iff ``tau < T(lam)``, one *solvency threshold* shared by
  all queries, so the active set is always "the easiest first";
* both ``x`` and ``T`` are non-increasing in ``lam``.

Each curve exposes the forward maps (``slack``, ``solvency_threshold``), their
inverses (``price_at_slack``, ``price_at_threshold``) and the per-query surplus
the paper's bisection evaluates directly (``surplus``), which the tests use to
check the closed-form solvency rule against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import lambertw

from clear_core.errors import InvalidInputError

# Lambert W's principal branch is real only for z >= -1/e; our argument is
# lam * e / alpha >= 0, so this only guards against misuse.
_LAMBERTW_BRANCH_POINT = -1.0 / math.e


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise InvalidInputError(name, value, "must be a finite number > 0")
    return value


def lambertw_real(z: np.ndarray | float) -> np.ndarray:
    """Principal branch W0 of ``z >= -1/e`` as real floats (scipy returns complex)."""
    z = np.asarray(z, dtype=float)
    if np.any(z < _LAMBERTW_BRANCH_POINT):
        bad = float(z[z < _LAMBERTW_BRANCH_POINT].min())
        raise InvalidInputError("lambertw argument", bad, "W0 is real only for z >= -1/e")
    return lambertw(z, k=0).real


class UtilityCurve:
    """Interface of a shifted utility curve (see the module docstring).

    Prices are in utility per token, slacks and thresholds in tokens.
    """

    name: str = "abstract"
    #: alpha: slope of g at the threshold; at a price >= alpha nobody is solvent.
    alpha: float
    #: slack bought at price 0 (the peak of the curve, ``argmax g``).
    peak_slack: float

    @property
    def max_price(self) -> float:
        """Price at and above which every query is abandoned (the reservation price)."""
        return self.alpha

    def gain(self, x: np.ndarray) -> np.ndarray:
        """g(x): utility of ``x >= 0`` tokens beyond the threshold."""
        raise NotImplementedError

    def value(self, t: np.ndarray, tau: np.ndarray) -> np.ndarray:
        """u(t) = g(t - tau) for t > tau, else 0 (Eq. 1 for the shifted surge)."""
        x = np.asarray(t, dtype=float) - np.asarray(tau, dtype=float)
        return np.where(x > 0.0, self.gain(np.maximum(x, 0.0)), 0.0)

    def slack(self, lam: np.ndarray | float) -> np.ndarray:
        """Optimal slack x(lam) of a solvent query (left-continuous, non-increasing)."""
        raise NotImplementedError

    def solvency_threshold(self, lam: np.ndarray | float) -> np.ndarray:
        """T(lam): a query is solvent at price lam iff its threshold is < T(lam)."""
        raise NotImplementedError

    def price_at_slack(self, x: float) -> float:
        """inf{lam >= 0 : slack(lam) <= x}, the cheapest price that buys no more than x."""
        raise NotImplementedError

    def price_at_threshold(self, tau: np.ndarray) -> np.ndarray:
        """inf{lam >= 0 : T(lam) <= tau}: the price at which a query of threshold tau turns insolvent."""
        raise NotImplementedError

    def surplus(self, lam: float, tau: np.ndarray) -> np.ndarray:
        """Net surplus u(t*) - lam * t* at the optimal cap t* = tau + slack(lam).

        This is the paper's direct solvency test ("zero out allocations where
        the cost exceeds the utility"); the reference bisection uses it.
        """
        tau = np.asarray(tau, dtype=float)
        x = np.broadcast_to(self.slack(lam), tau.shape)
        return self.gain(x) - lam * (tau + x)


@dataclass(frozen=True)
class _GlobalShape(UtilityCurve):
    """Global (alpha, beta), as the paper's model-intrinsic assumption; peak at slack 1/beta."""

    alpha: float = 2.0
    beta: float = 1.0 / 256.0

    def __post_init__(self) -> None:
        _check_positive("alpha", self.alpha)
        _check_positive("beta", self.beta)

    @property
    def peak_slack(self) -> float:  # type: ignore[override]
        return 1.0 / self.beta


@dataclass(frozen=True)
class ShiftedSurge(_GlobalShape):
    """u(t) = alpha (t - tau) exp(-beta (t - tau)) for t > tau (Eq. 1).

    Optimal cap (Theorem 4.2, Eq. 5): with ``W = W0(lam e / alpha)``,
    ``t* = tau + (1 - W) / beta``. Surplus at ``t*`` simplifies (using
    ``e^W = lam e / (alpha W)``) to ``lam ((1 - W)^2 / (beta W) - tau)``, so the
    solvency threshold is ``T(lam) = (1 - W)^2 / (beta W)``.
    """

    name: ClassVar[str] = "surge"

    def gain(self, x):
        x = np.asarray(x, dtype=float)
        return self.alpha * x * np.exp(-self.beta * x)

    def _w(self, lam):
        lam = np.asarray(lam, dtype=float)
        return lambertw_real(np.clip(lam, 0.0, self.alpha) * math.e / self.alpha)

    def slack(self, lam):
        lam = np.asarray(lam, dtype=float)
        x = (1.0 - self._w(lam)) / self.beta
        return np.where(lam >= self.alpha, 0.0, np.maximum(x, 0.0))

    def solvency_threshold(self, lam):
        lam = np.asarray(lam, dtype=float)
        w = self._w(lam)
        with np.errstate(divide="ignore"):
            t = np.where(w > 0.0, (1.0 - w) ** 2 / (self.beta * np.where(w > 0, w, 1.0)), np.inf)
        return np.where(lam >= self.alpha, 0.0, t)

    def price_at_slack(self, x: float) -> float:
        # Invert x = (1 - W) / beta: W = 1 - beta x, and W e^W = lam e / alpha
        # gives lam = alpha W e^(W - 1).
        if x >= self.peak_slack:
            return 0.0
        w = 1.0 - self.beta * max(x, 0.0)
        return float(self.alpha * w * math.exp(w - 1.0))

    def price_at_threshold(self, tau):
        # Solve (1 - W)^2 = beta tau W for the root W in (0, 1]:
        # W^2 - (2 + beta tau) W + 1 = 0.
        bt = self.beta * np.asarray(tau, dtype=float)
        b = 2.0 + bt
        w = 2.0 / (b + np.sqrt(b * b - 4.0))  # = (b - sqrt(b^2-4)) / 2, stable form
        return self.alpha * w * np.exp(w - 1.0)


@dataclass(frozen=True)
class Triangular(_GlobalShape):
    """Tent-shaped utility (Sec. 7.4, Eq. 17, reconstructed).

    ``g`` rises linearly with slope ``alpha`` to its peak ``U = alpha * p`` at
    ``x = p = 1 / beta`` and falls linearly to 0 at ``x = 2 p`` (the maximum
    extension). Same initial velocity and peak location as the shifted surge
    with the same (alpha, beta), so the variants are comparable.

    At a price ``lam < alpha`` the marginal utility ``alpha`` beats the price
    all the way to the peak, so every solvent query buys exactly ``p``;
    surplus ``U - lam (tau + p) > 0`` gives ``T(lam) = U / lam - p``.
    """

    name: ClassVar[str] = "triangular"

    @property
    def peak_utility(self) -> float:
        return self.alpha * self.peak_slack

    def gain(self, x):
        x = np.asarray(x, dtype=float)
        p = self.peak_slack
        rise = self.alpha * x
        fall = self.peak_utility * (2.0 * p - x) / p
        return np.clip(np.where(x <= p, rise, fall), 0.0, None)

    def slack(self, lam):
        lam = np.asarray(lam, dtype=float)
        return np.where(lam <= self.alpha, self.peak_slack, 0.0)

    def solvency_threshold(self, lam):
        lam = np.asarray(lam, dtype=float)
        with np.errstate(divide="ignore"):
            t = self.peak_utility / lam - self.peak_slack
        return np.where(lam >= self.alpha, 0.0, np.where(lam > 0, t, np.inf))

    def price_at_slack(self, x: float) -> float:
        return 0.0 if x >= self.peak_slack else self.alpha

    def price_at_threshold(self, tau):
        tau = np.asarray(tau, dtype=float)
        return np.minimum(self.peak_utility / (tau + self.peak_slack), self.alpha)


@dataclass(frozen=True)
class Quadratic(_GlobalShape):
    """Concave quadratic peak over the same support (Sec. 7.4, Eq. 18, reconstructed).

    ``g(x) = U (1 - ((x - p) / p)^2)`` on ``[0, 2p]`` with ``p = 1 / beta`` and
    ``U = alpha p / 2`` so that ``g'(0) = alpha``. First-order condition
    ``g'(x) = lam`` gives ``x(lam) = p (1 - r)`` with ``r = lam / alpha``;
    surplus ``> 0`` gives ``T(lam) = p (1 - r)^2 / (2 r)``.
    """

    name: ClassVar[str] = "quadratic"

    def gain(self, x):
        x = np.asarray(x, dtype=float)
        p = self.peak_slack
        u = 0.5 * self.alpha * p * (1.0 - ((x - p) / p) ** 2)
        return np.clip(u, 0.0, None)

    def slack(self, lam):
        r = np.clip(np.asarray(lam, dtype=float) / self.alpha, 0.0, 1.0)
        return self.peak_slack * (1.0 - r)

    def solvency_threshold(self, lam):
        r = np.clip(np.asarray(lam, dtype=float) / self.alpha, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            t = self.peak_slack * (1.0 - r) ** 2 / (2.0 * np.where(r > 0, r, 1.0))
        return np.where(r > 0, t, np.inf)

    def price_at_slack(self, x: float) -> float:
        if x >= self.peak_slack:
            return 0.0
        return float(self.alpha * (1.0 - max(x, 0.0) / self.peak_slack))

    def price_at_threshold(self, tau):
        # p (1 - r)^2 = 2 r tau  =>  r^2 - 2 r (1 + tau / p) + 1 = 0, root in (0, 1].
        c = 1.0 + np.asarray(tau, dtype=float) / self.peak_slack
        r = 1.0 / (c + np.sqrt(c * c - 1.0))  # = c - sqrt(c^2 - 1), stable form
        return self.alpha * r


UTILITIES: dict[str, type[UtilityCurve]] = {
    "surge": ShiftedSurge,
    "triangular": Triangular,
    "quadratic": Quadratic,
}


def make_utility(name: str, alpha: float, beta: float) -> UtilityCurve:
    """Build a utility curve by name (``surge``, ``triangular`` or ``quadratic``)."""
    try:
        cls = UTILITIES[name]
    except KeyError:
        raise InvalidInputError("utility", name, f"expected one of {sorted(UTILITIES)}") from None
    return cls(alpha=alpha, beta=beta)
