"""Allocation policies behind one interface (Appendix A.2 and Sec. 7.4).

A policy turns predicted thresholds and a batch budget into integer caps that
sum to at most the budget. Names are exactly those of the paper's baselines
plus our variants::

    uniform, proportional, tale-ep, heuristic, auction,
    clear, clear-paper, clear-optimal, clear-triangular, clear-quadratic, oracle

``clear`` is market clearing with one change to the paper's rule: when the
thresholds are predictions with log-normal error ``sigma`` (``log_sigma > 0``),
each query's utility is its probability of finishing,
``Phi(ln(c / tau_hat) / sigma)``, instead of the shifted surge at the point
prediction (see :mod:`clear_core.uncertainty`); with exact thresholds
(``log_sigma = 0``) it is the paper's rule. ``clear-paper`` is the paper's
rule as written whatever the uncertainty. ``clear-optimal``,
``clear-triangular`` and ``clear-quadratic`` are ablations of the paper's
model (solver and curve shape) and, like ``clear-paper``, take the thresholds
at face value.

Policy specs may carry parameters: ``clear:beta=0.01``, ``clear:alpha=4``,
``clear:fill=0``, ``clear:uncertainty=0`` (see :func:`parse_policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clear_core.errors import InvalidInputError, UnknownPolicyError
from clear_core.uncertainty import clear_market_lognormal
from clear_core.market import (
    DEFAULT_MIN_SLACK_TOKENS,
    clear_market,
    validate_budget,
    validate_max_tokens,
    validate_thresholds,
)

#: Minimum cap of the proportional baseline (Appendix A.2.2: "e.g. 32 tokens").
PROPORTIONAL_MIN_TOKENS = 32
#: Heuristic policy: the cutoff rule fires when B/N / mean(tau) < this.
HEURISTIC_SCARCITY = 0.8


@dataclass(frozen=True)
class Allocation:
    caps: np.ndarray  # query -> integer completion cap in tokens (0 = abandoned)
    shadow_price: float  # market-clearing price; nan for policies without a market
    active: np.ndarray  # query -> admitted (gets a positive cap)
    beta: float = math.nan  # decay rate used by market policies

    @property
    def abandonment_rate(self) -> float:
        return float((~self.active).mean()) if self.active.size else 0.0


@dataclass(frozen=True)
class Truth:
    """What only the oracle may see: the true lengths and correctness."""

    tokens: np.ndarray  # query -> true completion length (tokens)
    correct: np.ndarray  # query -> the completed answer is correct


def _as_alloc(caps: np.ndarray, price: float = math.nan, beta: float = math.nan) -> Allocation:
    caps = np.asarray(caps, dtype=np.int64)
    return Allocation(caps=caps, shadow_price=price, active=caps > 0, beta=beta)


def _fit_floor(real: np.ndarray, budget: float) -> np.ndarray:
    """Floor real caps and make sure the integers never exceed the budget."""
    caps = np.floor(real + 1e-9).astype(np.int64)
    excess = int(caps.sum()) - int(math.floor(budget))
    if excess > 0:
        for i in np.argsort(-caps, kind="stable")[:excess]:
            caps[i] -= 1
    return np.maximum(caps, 0)


def _round_to_budget(real: np.ndarray, budget: float, t_max: float) -> np.ndarray:
    """Floor real caps, then give the rounding remainder (< one token per query) to the
    admitted queries with the largest fractional parts, never above ``t_max``."""
    caps = _fit_floor(real, budget)
    remainder = int(math.floor(budget)) - int(caps.sum())
    room = (real > 0) & (caps + 1 <= t_max)
    candidates = np.flatnonzero(room)
    if remainder > 0 and candidates.size:
        frac = (real - caps)[candidates]
        caps[candidates[np.argsort(-frac, kind="stable")[:remainder]]] += 1
    return caps


def _affine_share(tau: np.ndarray, selected: np.ndarray, budget: float, t_max: float) -> np.ndarray:
    """Survivors get their threshold plus an equal share of what is left (Eq. 25 reconstructed).

    The printed rule ``mu + kappa (tau - mu)`` cannot meet the budget (its sum
    does not depend on kappa); this is the affine rule that does. If the
    survivors' thresholds alone exceed the budget they are scaled down
    proportionally instead.
    """
    real = np.zeros(tau.size)
    k = int(selected.sum())
    if k == 0:
        return real
    need = float(tau[selected].sum())
    if need <= budget:
        real[selected] = tau[selected] + (budget - need) / k
    else:
        real[selected] = tau[selected] * (budget / need)
    return np.minimum(real, t_max)


class Policy:
    """``allocate(thresholds, budget, ...) -> Allocation``; caps sum to <= budget."""

    name = "abstract"

    def allocate(
        self,
        thresholds,
        budget,
        *,
        max_tokens: float | None = None,
        truth: Truth | None = None,
        log_sigma: float = 0.0,
    ) -> Allocation:
        tau = validate_thresholds(thresholds)
        b = validate_budget(budget)
        t_max = validate_max_tokens(max_tokens)
        if not (math.isfinite(log_sigma) and log_sigma >= 0):
            raise InvalidInputError("log_sigma", log_sigma, "must be finite and >= 0")
        if tau.size == 0:
            return _as_alloc(np.zeros(0, dtype=np.int64))
        return self._allocate(tau, b, t_max, truth, log_sigma)

    def _allocate(self, tau, budget, t_max, truth, log_sigma) -> Allocation:
        raise NotImplementedError


class Uniform(Policy):
    """t_i = B / N for every query (Eq. 19)."""

    name = "uniform"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        each = min(math.floor(budget / tau.size), t_max)
        return _as_alloc(np.full(tau.size, int(each)))


class Proportional(Policy):
    """t_i = tau_i / sum(tau) * B clipped to [32, t_max]; never abandons (Eq. 20)."""

    name = "proportional"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        lo = min(PROPORTIONAL_MIN_TOKENS, budget / tau.size)
        total = tau.sum()
        real = tau / total * budget if total > 0 else np.full(tau.size, budget / tau.size)
        real = np.clip(real, lo, t_max)
        if real.sum() > budget:  # the floor pushed it over: shrink the part above the floor
            above = real - lo
            real = lo + above * max(budget - lo * tau.size, 0.0) / above.sum()
        return _as_alloc(_fit_floor(real, budget))


class TaleEP(Policy):
    """TALE-EP's renormalised estimate with exact conservation (Eqs. 21-23).

    Offline there is no teacher model, so the teacher's raw estimate is the
    same predicted threshold every policy sees; what distinguishes TALE-EP is
    clipping to ``[1, t_max]``, integerisation and the residual correction
    that makes the caps sum to the budget exactly. (The paper's regeneration
    with the budget in the prompt changes the model's lengths, which an
    offline replay cannot reproduce.)
    """

    name = "tale-ep"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        total = tau.sum()
        raw = tau / total * budget if total > 0 else np.full(tau.size, budget / tau.size)
        real = np.clip(raw, 1.0, t_max)
        caps = np.floor(real).astype(np.int64)
        residual = int(math.floor(budget)) - int(caps.sum())
        if residual > 0:  # hand out the remainder by largest fractional part, within t_max
            room = np.floor(t_max - caps) if math.isfinite(t_max) else np.full(caps.size, np.inf)
            order = np.argsort(-(real - caps), kind="stable")
            while residual > 0 and (room > 0).any():
                for i in order:
                    if residual == 0:
                        break
                    if room[i] > 0:
                        caps[i] += 1
                        room[i] -= 1
                        residual -= 1
        elif residual < 0:
            caps = _fit_floor(caps.astype(float), budget)
        return _as_alloc(caps)


class Heuristic(Policy):
    """CLEAR (Heuristic), Appendix A.2.4: drop the harder half when budget is scarce."""

    name = "heuristic"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        mean = tau.mean()
        eta = (budget / tau.size) / mean if mean > 0 else math.inf
        selected = tau <= np.median(tau) if eta < HEURISTIC_SCARCITY else np.ones(tau.size, bool)
        return _as_alloc(_round_to_budget(_affine_share(tau, selected, budget, t_max), budget, t_max))


class Auction(Policy):
    """CLEAR (Auction), Appendix A.2.5: longest easiest-first prefix whose thresholds fit."""

    name = "auction"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        order = np.argsort(tau, kind="stable")
        k = int(np.searchsorted(np.cumsum(tau[order]), budget, side="right"))
        selected = np.zeros(tau.size, bool)
        selected[order[:k]] = True
        return _as_alloc(_round_to_budget(_affine_share(tau, selected, budget, t_max), budget, t_max))


class Oracle(Policy):
    """Upper bound (Appendix A.2.6): the shortest solvable queries first, each exactly d_i."""

    name = "oracle"

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        if truth is None:
            raise InvalidInputError("truth", None, "the oracle policy needs the true lengths and correctness")
        d = np.asarray(truth.tokens, dtype=float)
        ok = np.asarray(truth.correct, dtype=bool) & (d <= t_max)
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(d[idx], kind="stable")]
        k = int(np.searchsorted(np.cumsum(d[idx]), budget, side="right"))
        caps = np.zeros(tau.size, dtype=np.int64)
        caps[idx[:k]] = np.ceil(d[idx[:k]]).astype(np.int64)
        return _as_alloc(caps)


@dataclass
class Clear(Policy):
    """Market clearing with the Lambert-W policy (Secs. 4-5) and its variants."""

    name: str = "clear"
    method: str = "exact"
    utility: str = "surge"
    alpha: float = 2.0
    beta: float | None = None  # None: adaptive (Eq. 16)
    fill_unused: bool = True
    uncertainty: bool = True  # price the predictor's log-normal error (False: the paper's rule)
    min_slack_tokens: float = DEFAULT_MIN_SLACK_TOKENS

    def _allocate(self, tau, budget, t_max, truth, log_sigma):
        max_tokens = None if math.isinf(t_max) else t_max
        if self.uncertainty and log_sigma > 0.0:
            res = clear_market_lognormal(
                tau, budget, log_sigma=log_sigma, max_tokens=max_tokens, fill_unused=self.fill_unused
            )
            return Allocation(caps=res.caps, shadow_price=res.shadow_price, active=res.active, beta=res.beta)
        res = clear_market(
            tau,
            budget,
            alpha=self.alpha,
            beta=self.beta,
            max_tokens=max_tokens,
            method=self.method,
            utility=self.utility,
            fill_unused=self.fill_unused,
            min_slack_tokens=self.min_slack_tokens,
        )
        return Allocation(caps=res.caps, shadow_price=res.shadow_price, active=res.active, beta=res.beta)


def _clear_factory(**defaults):
    def make(**params):
        merged = {**defaults, **params}
        return Clear(**merged)

    return make


POLICIES = {
    "uniform": Uniform,
    "proportional": Proportional,
    "tale-ep": TaleEP,
    "heuristic": Heuristic,
    "auction": Auction,
    "oracle": Oracle,
    "clear": _clear_factory(name="clear"),
    "clear-paper": _clear_factory(name="clear-paper", uncertainty=False),
    "clear-optimal": _clear_factory(name="clear-optimal", method="optimal", uncertainty=False),
    "clear-triangular": _clear_factory(name="clear-triangular", utility="triangular", uncertainty=False),
    "clear-quadratic": _clear_factory(name="clear-quadratic", utility="quadratic", uncertainty=False),
}

# Short parameter names accepted in a policy spec -> Clear field and parser.
_SPEC_PARAMS = {
    "alpha": ("alpha", float),
    "beta": ("beta", float),
    "fill": ("fill_unused", lambda v: v.lower() in ("1", "true", "yes", "on")),
    "uncertainty": ("uncertainty", lambda v: v.lower() in ("1", "true", "yes", "on")),
    "min_slack": ("min_slack_tokens", float),
    "method": ("method", str),
}


def parse_policy(spec: str) -> Policy:
    """Build a policy from ``name`` or ``name:key=value,key=value`` (clear* only take params)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in POLICIES:
        raise UnknownPolicyError("policy", name, f"expected one of {sorted(POLICIES)}")
    params = {}
    if rest:
        if not name.startswith("clear"):
            raise InvalidInputError("policy", spec, f"{name} takes no parameters")
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in _SPEC_PARAMS:
                raise InvalidInputError("policy parameter", item, f"expected key=value with key in {sorted(_SPEC_PARAMS)}")
            field_name, conv = _SPEC_PARAMS[key.strip()]
            try:
                params[field_name] = conv(value.strip())
            except ValueError:
                raise InvalidInputError(f"policy parameter {key}", value, "not a valid value") from None
    return POLICIES[name](**params)


def get_policy(name: str, **params) -> Policy:
    """Build a registered policy by exact name, with keyword parameters for clear* policies."""
    if name not in POLICIES:
        raise UnknownPolicyError("policy", name, f"expected one of {sorted(POLICIES)}")
    return POLICIES[name](**params)
