"""Allocation policies behind one interface (Appendix A.2 and Sec. 7.4).

A policy turns predicted thresholds and a batch budget into integer caps that
sum to at most the budget. Names are exactly those of the paper's baselines
plus our variants::

    uniform, proportional, tale-ep, heuristic, auction,
    clear, clear-paper, clear-optimal, clear-triangular, clear-quadratic, oracle

and, beyond the paper, ``clear-cost`` / ``clear-cost-emp`` (markets on expected
generated tokens, :mod:`clear_core.consumption`, :mod:`clear_core.empirical_market`)
and ``uniform-generated`` (a cost baseline that needs the true lengths).

Two market policies with their own parameters:

:class:`ClearLognormal` (``clear``)
    Market clearing with one change to the paper's rule: the thresholds are
    predictions with log-normal error ``sigma`` (``log_sigma > 0``), so each
    query's utility is its probability of finishing,
    ``Phi(ln(c / tau_hat) / sigma)`` (:mod:`clear_core.uncertainty`). Its only
    parameter is ``fill``. With exact thresholds (``log_sigma = 0``) that
    utility is a step at the threshold, and ``clear`` clears the paper's market
    with its default surge (:class:`ClearSurge` with no parameters).
:class:`ClearSurge` (``clear-paper`` and its ablations)
    The paper's rule as written (Eq. 1 utility, Lambert-W caps, Algorithm 1 or
    its exact equivalent), taking the thresholds at face value whatever their
    error. ``clear-optimal``, ``clear-triangular`` and ``clear-quadratic`` are
    the same policy with another solver or curve. Parameters: ``alpha``,
    ``beta``, ``method``, ``utility``, ``fill``, ``min_slack``.

Policy specs may carry parameters, ``name:key=value,key=value`` (for example
``clear-paper:beta=0.01,alpha=4,fill=0``); a parameter the policy's solver does
not use is refused. :func:`parse_policy_list` reads a comma-separated *list* of
specs: a comma followed by ``key=value`` continues the previous spec, so
``uniform,clear-paper:beta=0.01,alpha=4,clear`` is three policies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clear_core.consumption import SIGMA_MIN, caps_at_log_prices, clear_consumption_market
from clear_core.empirical_market import (
    EmpiricalLengths, caps_at_log_price_empirical, checked_length_bins, clear_empirical_market, lognormal_lengths,
)
from clear_core.errors import InvalidInputError, UnknownPolicyError
from clear_core.market import (
    DEFAULT_MIN_SLACK_TOKENS,
    METHODS,
    MarketResult,
    clear_market,
    validate_budget,
    validate_context_limit,
    validate_thresholds,
)
from clear_core.numerics import floor_caps, integer_caps
from clear_core.servable import NO_PRICE, MarketPrices, ServableMarket
from clear_core.simulate import uniform_cap_within
from clear_core.uncertainty import caps_at_prices, clear_market_lognormal
from clear_core.utility import UTILITIES, ShiftedSurge

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
    iterations: int = 0  # market policies: the solver's probes or search steps
    converged: bool = True  # market policies: the solver met its tolerance
    reservation_price: float = 0.0  # price of a token held reserved (prices_reservations policies; 0: caps fit)

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


def _from_market(res: MarketResult) -> Allocation:
    return Allocation(
        caps=res.caps, shadow_price=res.shadow_price, active=res.active, beta=res.beta,
        iterations=res.iterations, converged=res.converged,
    )


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


@dataclass(frozen=True)
class MarketInputs:
    """What a batch is told besides its thresholds, validated by :meth:`Policy.allocate`."""

    truth: Truth | None  # the oracle's and uniform-generated's hindsight
    log_sigma: float | np.ndarray  # the predictor's error in log space: one, or one per query
    weights: np.ndarray | None  # query -> value weight (None: all 1)
    runaway: np.ndarray  # query -> probability of never finishing
    lengths: object = None  # clear_core.empirical_market.EmpiricalLengths (clear-cost-emp)
    mean_cap_budget: float | None = None  # bound on the mean admitted cap (the reservation price)
    share_hint: float | None = None  # where the search for the reservation share starts

    def one_sigma(self) -> float:
        """The single spread of a policy that prices one (the median of per-query spreads)."""
        sig = np.asarray(self.log_sigma, dtype=float)
        return float(np.median(sig)) if sig.ndim else float(sig)


class Policy:
    """``allocate(thresholds, budget, ...) -> Allocation``; caps sum to <= budget."""

    name = "abstract"
    #: Spec parameters this policy accepts: short name -> (field, parser). None take none.
    spec_params: dict = {}
    #: Queries' value weights (tenant weights) change its allocation; the others refuse unequal weights.
    weights_tenants: bool = False
    #: It prices a second budget on the caps themselves (``mean_cap_budget``); the others refuse one.
    prices_reservations: bool = False
    #: Its budget counts expected generated tokens, so it prices each query's length distribution.
    charges_generated_tokens: bool = False
    #: It prices each query's empirical length histogram (``lengths``), with the raw prediction as threshold.
    prices_length_histograms: bool = False

    def allocate(
        self,
        thresholds,
        budget,
        *,
        context_limit_tokens: float | None = None,
        truth: Truth | None = None,
        log_sigma=0.0,
        weights=None,
        runaway=0.0,
        lengths=None,
        mean_cap_budget: float | None = None,
        share_hint: float | None = None,
    ) -> Allocation:
        """Integer caps for predicted ``thresholds`` under ``budget`` tokens.

        ``context_limit_tokens`` is ``t_max`` (no cap exceeds it); ``truth`` is
        for the hindsight policies only; ``log_sigma`` is the predictor's error
        in log space, one for all queries or one per query (policies that price
        a single spread take the median); ``weights`` are the queries' value
        weights (tenant weights, Eq. 2's alpha_i), which only weight-aware
        policies (``weights_tenants``) accept when they differ; ``runaway`` is
        each query's probability of never finishing (priced by ``clear-cost``);
        ``lengths`` each query's empirical length distribution
        (:class:`clear_core.empirical_market.EmpiricalLengths`, ``clear-cost-emp``);
        ``mean_cap_budget`` bounds the mean cap of the admitted queries as well (a second price, on a
        reserved token: :mod:`clear_core.empirical_market`; ``prices_reservations`` policies only), and
        ``share_hint`` is where its search for the reservation share starts (the last clearing's).
        """
        tau = validate_thresholds(thresholds)
        b = validate_budget(budget)
        t_max = validate_context_limit(context_limit_tokens)
        sig = np.asarray(log_sigma, dtype=float)
        if sig.ndim > 1 or (sig.ndim == 1 and sig.shape != tau.shape):
            raise InvalidInputError("log_sigma", f"shape {sig.shape}", f"must be a number or match thresholds {tau.shape}")
        bad = ~np.isfinite(sig) | (sig < 0)
        if bad.any():
            raise InvalidInputError("log_sigma", float(sig.flat[int(np.argmax(bad))]), "must be finite and >= 0")
        if weights is not None:
            w = np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)
            if (~np.isfinite(w) | (w <= 0)).any():
                raise InvalidInputError("weights", weights, "must be finite and > 0")
            if not self.weights_tenants and w.size and (w != w.flat[0]).any():
                raise InvalidInputError("weights", "unequal", f"{self.name} does not weight queries")
            weights = w if self.weights_tenants else None
        if mean_cap_budget is not None and not self.prices_reservations:
            raise InvalidInputError("mean_cap_budget", mean_cap_budget, f"{self.name} does not price reservations")
        if tau.size == 0:
            return _as_alloc(np.zeros(0, dtype=np.int64))
        inputs = MarketInputs(truth=truth, log_sigma=sig if sig.ndim else float(sig), weights=weights,
                              runaway=np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape), lengths=lengths,
                              mean_cap_budget=mean_cap_budget, share_hint=share_hint)
        return self._allocate(tau, b, t_max, inputs)

    def _allocate(self, tau: np.ndarray, budget: float, t_max: float, inputs: MarketInputs) -> Allocation:
        raise NotImplementedError


class Uniform(Policy, ServableMarket):
    """t_i = B / N for every query (Eq. 19)."""

    name = "uniform"

    def _allocate(self, tau, budget, t_max, inputs):
        each = min(math.floor(budget / tau.size), t_max)
        return _as_alloc(np.full(tau.size, int(each)))

    # -- served (ServableMarket): no price; every request gets the per-query budget ---------------

    def clear_rows(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None, share_hint=None):
        return self.allocate(rows[:, 0], budget, context_limit_tokens=context_limit_tokens)

    def quote_prices(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None):
        return NO_PRICE

    def caps_at_prices(self, prices, rows, *, budget_per_query, context_limit_tokens, lengths=()):
        limit = math.inf if context_limit_tokens is None else float(context_limit_tokens)
        return np.full(rows.shape[0], int(min(math.floor(budget_per_query), limit)), dtype=np.int64)


class UniformGenerated(Policy):
    """The uniform cap that fills a budget of *generated* tokens (a cost baseline, not a serving policy).

    The largest cap ``c`` with ``sum(min(c, d_i)) <= B``: what an operator who
    pays for generated tokens buys with uniform caps. It needs the true lengths
    ``d_i`` of the stream (``truth``), like the oracle, since what a cap costs
    is only known after generation.
    """

    name = "uniform-generated"

    def _allocate(self, tau, budget, t_max, inputs):
        if inputs.truth is None:
            raise InvalidInputError("truth", None, "uniform-generated needs the true lengths of the stream")
        limit = None if not math.isfinite(t_max) else t_max
        return _as_alloc(np.full(tau.size, uniform_cap_within(inputs.truth.tokens, budget, limit)))


class Proportional(Policy):
    """t_i = tau_i / sum(tau) * B clipped to [32, t_max]; never abandons (Eq. 20)."""

    name = "proportional"

    def _allocate(self, tau, budget, t_max, inputs):
        lo = min(PROPORTIONAL_MIN_TOKENS, budget / tau.size)
        total = tau.sum()
        real = tau / total * budget if total > 0 else np.full(tau.size, budget / tau.size)
        real = np.clip(real, lo, t_max)
        if real.sum() > budget:  # the floor pushed it over: shrink the part above the floor
            above = real - lo
            real = lo + above * max(budget - lo * tau.size, 0.0) / above.sum()
        return _as_alloc(integer_caps(real, budget))


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

    def _allocate(self, tau, budget, t_max, inputs):
        total = tau.sum()
        raw = tau / total * budget if total > 0 else np.full(tau.size, budget / tau.size)
        real = np.clip(raw, 1.0, t_max)
        # Residual correction: the floors' remainder by largest fractional part, within t_max.
        caps = integer_caps(real, budget, limit=t_max)
        return _as_alloc(caps)


class Heuristic(Policy):
    """CLEAR (Heuristic), Appendix A.2.4: drop the harder half when budget is scarce."""

    name = "heuristic"

    def _allocate(self, tau, budget, t_max, inputs):
        mean = tau.mean()
        eta = (budget / tau.size) / mean if mean > 0 else math.inf
        selected = tau <= np.median(tau) if eta < HEURISTIC_SCARCITY else np.ones(tau.size, bool)
        return _as_alloc(integer_caps(_affine_share(tau, selected, budget, t_max), budget, limit=t_max))


class Auction(Policy):
    """CLEAR (Auction), Appendix A.2.5: longest easiest-first prefix whose thresholds fit."""

    name = "auction"

    def _allocate(self, tau, budget, t_max, inputs):
        order = np.argsort(tau, kind="stable")
        k = int(np.searchsorted(np.cumsum(tau[order]), budget, side="right"))
        selected = np.zeros(tau.size, bool)
        selected[order[:k]] = True
        return _as_alloc(integer_caps(_affine_share(tau, selected, budget, t_max), budget, limit=t_max))


class Oracle(Policy):
    """Upper bound (Appendix A.2.6): the shortest solvable queries first, each exactly d_i."""

    name = "oracle"

    def _allocate(self, tau, budget, t_max, inputs):
        truth = inputs.truth
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


def _flag(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _choice(options):
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(value)
        return value

    return parse


_FILL = {"fill": ("fill_unused", _flag)}


@dataclass
class ClearSurge(Policy):
    """The paper's market: shifted-surge utility and Lambert-W caps (Secs. 4-5), and its ablations."""

    name: str = "clear-paper"
    method: str = "exact"  # a solver of clear_core.market.SOLVERS
    utility: str = "surge"  # surge (Eq. 1), triangular or quadratic (Sec. 7.4)
    alpha: float = 2.0  # initial velocity (the reservation price)
    beta: float | None = None  # decay rate; None: adaptive (Eq. 16)
    fill_unused: bool = True  # share the budget an abandonment jump leaves unspent
    min_slack_tokens: float = DEFAULT_MIN_SLACK_TOKENS  # floor of the adaptive 1/beta

    spec_params = {
        "alpha": ("alpha", float),
        "beta": ("beta", float),
        "method": ("method", _choice(METHODS)),
        "utility": ("utility", _choice(UTILITIES)),
        "min_slack": ("min_slack_tokens", float),
        **_FILL,
    }

    def _allocate(self, tau, budget, t_max, inputs):
        res = clear_market(
            tau,
            budget,
            alpha=self.alpha,
            beta=self.beta,
            context_limit_tokens=None if math.isinf(t_max) else t_max,
            method=self.method,
            utility=self.utility,
            fill_unused=self.fill_unused,
            min_slack_tokens=self.min_slack_tokens,
        )
        return _from_market(res)


def _limit(t_max: float) -> float | None:
    return None if math.isinf(t_max) else t_max


def _log(price: float) -> float:
    return math.log(price) if price > 0 else -math.inf


def _weighted(res) -> Allocation:
    """An Allocation from a ConsumptionResult (the markets on expected generated tokens)."""
    return Allocation(caps=res.caps, shadow_price=res.shadow_price, active=res.active, iterations=res.iterations,
                      converged=res.converged, reservation_price=res.reservation_price)


@dataclass
class ClearLognormal(Policy, ServableMarket):
    """Market clearing on the probability of finishing under the predictor's error (``clear``)."""

    name: str = "clear"
    fill_unused: bool = True  # share the budget an abandonment jump leaves unspent

    spec_params = dict(_FILL)

    def _allocate(self, tau, budget, t_max, inputs):
        sigma = inputs.one_sigma()
        if sigma == 0.0:  # exact thresholds, offline: the paper's market (module docstring)
            return ClearSurge(name=self.name, fill_unused=self.fill_unused)._allocate(tau, budget, t_max, inputs)
        res = clear_market_lognormal(tau, budget, log_sigma=sigma, context_limit_tokens=_limit(t_max),
                                     fill_unused=self.fill_unused)
        return _from_market(res)

    # -- served (ServableMarket): one spread, the arriving request's centrally, the window's median quoted.
    # A zero spread (exact thresholds) is the paper's surge market in both decision modes.

    def clear_rows(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None, share_hint=None):
        return self.allocate(rows[:, 0], budget, context_limit_tokens=context_limit_tokens,
                             log_sigma=float(rows[-1, 1]))

    def quote_prices(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None):
        sigma = float(np.median(rows[:, 1]))
        if sigma == 0.0:
            res = clear_market(rows[:, 0], budget, context_limit_tokens=context_limit_tokens,
                               fill_unused=self.fill_unused)
            # The fill shares the budget the last abandonment left as one common slack: the price that
            # buys that slack is the price the solvent requests' caps are set at.
            active = res.caps > 0
            slack = float(np.min(res.caps[active] - rows[active, 0])) if active.any() else 0.0
            curve = ShiftedSurge(beta=res.beta)
            return MarketPrices(log_price=_log(res.shadow_price), log_fill_price=_log(curve.price_at_slack(slack)),
                                full_context=False, log_sigma=0.0, beta=res.beta)
        res = clear_market_lognormal(rows[:, 0], budget, log_sigma=sigma, context_limit_tokens=context_limit_tokens,
                                     fill_unused=self.fill_unused)
        return MarketPrices(log_price=_log(res.shadow_price), log_fill_price=_log(res.fill_price),
                            full_context=False, log_sigma=sigma)

    def caps_at_prices(self, prices, rows, *, budget_per_query, context_limit_tokens, lengths=()):
        # Every request's best response uses the spread its price was cleared with, so that price and caps
        # describe the same market.
        price = math.exp(prices.log_price) if prices.log_price > -math.inf else 0.0
        fill = math.exp(prices.log_fill_price) if prices.log_fill_price > -math.inf else 0.0
        tau = rows[:, 0]
        if prices.log_sigma == 0.0:  # the paper's market: solvent below T(price), cap tau + slack(fill price)
            curve = ShiftedSurge(beta=prices.beta)
            t_max = math.inf if context_limit_tokens is None else float(context_limit_tokens)
            solvent = (tau < curve.solvency_threshold(price)) & (tau < t_max)
            return np.where(solvent, floor_caps(np.minimum(tau + curve.slack(fill), t_max)), 0)
        return caps_at_prices(tau, log_sigma=prices.log_sigma, price=price, fill_price=fill,
                              context_limit_tokens=context_limit_tokens)


@dataclass
class ClearCost(Policy, ServableMarket):
    """Market clearing on *expected generated tokens* (``clear-cost``, :mod:`clear_core.consumption`).

    The budget is what the caps are expected to generate, ``sum E[min(D_i, c_i)]``,
    each query's length log-normal around its threshold with its own spread;
    the value is the weighted probability of finishing. Exact thresholds
    (``log_sigma = 0``) are priced with the narrowest spread of the grid.
    """

    name: str = "clear-cost"
    fill_unused: bool = True  # share the expected budget the last abandonment leaves unspent

    spec_params = dict(_FILL)
    weights_tenants = True
    prices_reservations = True
    charges_generated_tokens = True

    def _allocate(self, tau, budget, t_max, inputs):
        sig = np.maximum(inputs.log_sigma, SIGMA_MIN)
        weights, runaway, bound = inputs.weights, inputs.runaway, inputs.mean_cap_budget
        res = clear_consumption_market(tau, budget, log_sigma=sig, runaway=runaway, weights=weights,
                                       context_limit_tokens=_limit(t_max), fill_unused=self.fill_unused)
        if bound is not None and res.active.any() and res.caps[res.caps > 0].mean() > bound:
            # The caps do not fit what may be reserved: the same distributions on the grid of
            # clear_core.empirical_market, cleared with the second budget (its docstring).
            on_grid = lognormal_lengths(np.broadcast_to(sig, tau.shape), runaway)
            res = clear_empirical_market(tau, budget, lengths=on_grid, weights=weights,
                                         context_limit_tokens=_limit(t_max), mean_cap_budget=bound,
                                         share_hint=inputs.share_hint)
        return _weighted(res)

    # -- served (ServableMarket): each request's own spread, runaway share and weight ---------------------

    def clear_rows(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None, share_hint=None):
        return self.allocate(rows[:, 0], budget, context_limit_tokens=context_limit_tokens, log_sigma=rows[:, 1],
                             runaway=rows[:, 2], weights=rows[:, 3], mean_cap_budget=mean_cap_budget,
                             share_hint=share_hint)

    def quote_prices(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None):
        # Quotes price expected tokens only: a reservation price needs the histograms' grid (clear-cost-emp).
        res = clear_consumption_market(rows[:, 0], budget, log_sigma=np.maximum(rows[:, 1], SIGMA_MIN),
                                       runaway=rows[:, 2], weights=rows[:, 3],
                                       context_limit_tokens=context_limit_tokens, fill_unused=self.fill_unused)
        return MarketPrices(log_price=res.log_price, log_fill_price=res.log_fill_price, full_context=res.full_context)

    def caps_at_prices(self, prices, rows, *, budget_per_query, context_limit_tokens, lengths=()):
        return caps_at_log_prices(rows[:, 0], log_sigma=np.maximum(rows[:, 1], SIGMA_MIN), runaway=rows[:, 2],
                                  weights=rows[:, 3], log_price=prices.log_price, log_fill_price=prices.log_fill_price,
                                  full_context=prices.full_context, context_limit_tokens=context_limit_tokens)


@dataclass
class ClearCostEmpirical(Policy, ServableMarket):
    """``clear-cost`` with empirical length distributions (:mod:`clear_core.empirical_market`).

    The value is the chance of a correct answer within the cap, the cost the
    expected generated tokens, both from the histogram of the query's
    calibration bin; the thresholds are the raw predictions.
    """

    name: str = "clear-cost-emp"
    weights_tenants = True
    prices_reservations = True
    charges_generated_tokens = True
    prices_length_histograms = True

    def _allocate(self, tau, budget, t_max, inputs):
        if inputs.lengths is None:
            raise InvalidInputError("lengths", None, f"{self.name} needs each query's empirical length distribution")
        res = clear_empirical_market(tau, budget, lengths=inputs.lengths, weights=inputs.weights,
                                     mean_cap_budget=inputs.mean_cap_budget, share_hint=inputs.share_hint,
                                     context_limit_tokens=_limit(t_max))
        return _weighted(res)

    # -- served (ServableMarket): the histogram of each request's bin; quotes carry the reservation price --

    def _empirical(self, rows, lengths) -> EmpiricalLengths:
        return EmpiricalLengths(self.check_lengths(lengths), checked_length_bins(rows[:, 4], len(lengths)))

    def clear_rows(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None, share_hint=None):
        return self.allocate(rows[:, 0], budget, context_limit_tokens=context_limit_tokens, weights=rows[:, 3],
                             lengths=self._empirical(rows, lengths), mean_cap_budget=mean_cap_budget,
                             share_hint=share_hint)

    def quote_prices(self, rows, budget, *, context_limit_tokens, lengths=(), mean_cap_budget=None):
        res = clear_empirical_market(rows[:, 0], budget, lengths=self._empirical(rows, lengths), weights=rows[:, 3],
                                     context_limit_tokens=context_limit_tokens, mean_cap_budget=mean_cap_budget)
        return MarketPrices(log_price=res.log_price, log_fill_price=res.log_fill_price, full_context=res.full_context,
                            reservation_share=res.reservation_share)

    def caps_at_prices(self, prices, rows, *, budget_per_query, context_limit_tokens, lengths=()):
        return caps_at_log_price_empirical(rows[:, 0], lengths=self._empirical(rows, lengths), weights=rows[:, 3],
                                           log_price=prices.log_price, full_context=prices.full_context,
                                           context_limit_tokens=context_limit_tokens,
                                           reservation_share=prices.reservation_share)

    def cap_within(self, alloc, row, bound, *, context_limit_tokens, lengths=()):
        """The best response at the clearing's prices among the caps up to ``bound`` (the end of a block,
        :mod:`clear_core.online_market`): 0 when none of them is worth its price."""
        if bound < 1:
            return 0
        nu = float(alloc.shadow_price) + float(alloc.reservation_price)  # the price on the combined cost
        nu = nu if math.isfinite(nu) else 0.0
        limit = bound if context_limit_tokens is None else min(bound, float(context_limit_tokens))
        rows = np.asarray([row], dtype=float)
        cap = caps_at_log_price_empirical(
            rows[:, 0], lengths=self._empirical(rows, lengths), log_price=_log(nu), full_context=False,
            weights=rows[:, 3], context_limit_tokens=limit,
            reservation_share=float(alloc.reservation_price) / nu if nu > 0 else 0.0)
        return int(min(cap[0], math.floor(bound)))


def _preset(cls, **fixed):
    """A named policy: ``cls`` with some fields fixed; spec parameters may not override them."""

    def make(**params):
        clash = sorted(set(params) & set(fixed))
        if clash:
            raise InvalidInputError("policy parameter", clash[0], f"{fixed['name']} fixes it")
        return cls(**fixed, **params)

    make.spec_params = {k: v for k, v in cls.spec_params.items() if v[0] not in fixed}
    return make


POLICIES = {
    "uniform": Uniform,
    "uniform-generated": UniformGenerated,
    "proportional": Proportional,
    "tale-ep": TaleEP,
    "heuristic": Heuristic,
    "auction": Auction,
    "oracle": Oracle,
    "clear": _preset(ClearLognormal, name="clear"),
    "clear-cost": _preset(ClearCost, name="clear-cost"),
    "clear-cost-emp": ClearCostEmpirical,
    "clear-paper": _preset(ClearSurge, name="clear-paper"),
    "clear-optimal": _preset(ClearSurge, name="clear-optimal", method="optimal"),
    "clear-triangular": _preset(ClearSurge, name="clear-triangular", utility="triangular"),
    "clear-quadratic": _preset(ClearSurge, name="clear-quadratic", utility="quadratic"),
}


def parse_policy(spec: str) -> Policy:
    """Build a policy from ``name`` or ``name:key=value,key=value``.

    Only parameters the policy's solver uses are accepted (``spec_params`` of
    the policy); anything else is refused with an error naming it.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in POLICIES:
        raise UnknownPolicyError("policy", name, f"expected one of {sorted(POLICIES)}")
    accepted = POLICIES[name].spec_params
    params = {}
    if rest:
        if not accepted:
            raise InvalidInputError("policy", spec, f"{name} takes no parameters")
        for item in rest.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or key not in accepted:
                raise InvalidInputError(
                    f"{name} parameter", item, f"expected key=value with key in {sorted(accepted)}"
                )
            field_name, conv = accepted[key]
            try:
                params[field_name] = conv(value)
            except ValueError:
                raise InvalidInputError(f"{name} parameter {key}", value, "not a valid value") from None
    return POLICIES[name](**params)


def parse_policy_list(text: str) -> list[str]:
    """Split a comma-separated list of policy specs; ``key=value`` items continue the previous spec.

    A policy name never contains ``=`` and a parameter always does, so
    ``uniform,clear-paper:beta=0.01,alpha=4,clear`` is
    ``["uniform", "clear-paper:beta=0.01,alpha=4", "clear"]``. Every spec is
    checked with :func:`parse_policy`.
    """
    specs: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs:
                raise InvalidInputError("policy list", text, f"{item!r} has no policy before it")
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise InvalidInputError("policy list", text, "names no policy")
    for spec in specs:
        parse_policy(spec)
    return specs


def get_policy(name: str, **params) -> Policy:
    """Build a registered policy by exact name, with keyword parameters (the fields of its class)."""
    if name not in POLICIES:
        raise UnknownPolicyError("policy", name, f"expected one of {sorted(POLICIES)}")
    return POLICIES[name](**params)
