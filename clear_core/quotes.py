"""Price quotes: the shadow price as state, so that a decision needs no clearing.

The window market (:class:`clear_core.online_market.OnlineMarket`) clears the
recent demand for every arriving request. That clearing has one output that
matters to everyone else: the shadow price. Given it, each request's cap is
its own best response, a function of its threshold, spread, runaway share
and weight only: the market's *decentralisation*. A :class:`PriceQuote`
carries what a request needs to compute its cap without seeing anybody else:

* ``log_price``: ln of the shadow price, at which solvency is decided (a
  request whose surplus at this price is not positive is abandoned);
* ``log_fill_price``: ln of the (lower) price at which the solvent requests'
  caps are set. The clearing shares the budget that the last abandonment jump
  leaves unspent by lowering the price the solvent requests see, and the quote
  keeps that second price so a request of the cleared window gets back
  exactly the cap the clearing gave it;
* ``full_context``: the budget is abundant, every request gets the context limit;
* ``reservation_share`` (``clear-cost-emp``): with requests in flight the
  clearing had a second budget, on the caps themselves (what each open
  reservation may hold on average, ``mean_cap_budget``; README, "Requests in
  flight"), and its two prices travel as one price ``nu = exp(log_price)`` on
  the combined cost ``(1 - theta) E[min(D, c)] + theta c`` and the share
  ``theta``: ``nu (1 - theta)`` per expected generated token, ``nu theta``
  per reserved one (:mod:`clear_core.empirical_market`, "A second budget").
  0 when the caps fit. The other policies' quotes price expected tokens only.

:func:`quote_window` clears a window of demand rows and returns its quote;
:func:`caps_at_quote` answers any requests from a quote in ``O(1)`` each (a
table lookup for ``clear-cost``, a closed form for ``clear``). When traffic is
stationary a new request is a draw from the same demand as the window, so its
quoted cap is the cap the window market would have given it (the window
market adds the request itself to the window, which moves the price by one
part in the window size). The quote goes stale as demand and budget move; how
often it is refreshed is the caller's choice (the lease mode refreshes it on
every report from an ingress replica, :mod:`clear_core.lease`).

Quotable policies: ``clear-cost`` (consumption market), ``clear-cost-emp``
(the same market on the calibration's length histograms: a row carries its
bin, and the caller passes the histograms the bins index), ``clear``
(log-normal cap market; a zero spread is priced with :data:`MIN_QUOTE_SIGMA`)
and ``uniform`` (no price: every request gets the per-query budget).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from clear_core.consumption import SIGMA_MIN, caps_at_log_prices, clear_consumption_market
from clear_core.empirical_market import (
    EmpiricalLengths, caps_at_log_price_empirical, checked_length_bins, clear_empirical_market,
)
from clear_core.errors import InvalidInputError
from clear_core.policies import ClearCost, ClearCostEmpirical, ClearLognormal, Policy, Uniform
from clear_core.uncertainty import caps_at_prices, clear_market_lognormal

#: ``clear`` quotes need a positive spread; a predictor that reports none is priced with this one.
MIN_QUOTE_SIGMA = SIGMA_MIN
QUOTABLE_POLICIES = ("clear", "clear-cost", "clear-cost-emp", "uniform")
#: A window thinner than this travels with its quote, and each request is cleared with it (see caps_at_quote).
THIN_WINDOW_ROWS = 32


@dataclass(frozen=True)
class PriceQuote:
    """One clearing's prices, enough for any request to compute its own cap (module docstring)."""

    policy: str  # the policy's name (a quote is only read by the same policy)
    log_price: float  # ln shadow price (solvency); -inf: no price
    log_fill_price: float  # ln price the solvent requests' caps are set at (<= log_price); -inf: none
    full_context: bool  # abundant: every request gets the context limit
    budget_per_query_tokens: float  # b the window was cleared with (uniform's cap)
    window_size: int  # demand rows the quote was cleared over
    version: int = 0  # increases with every new quote of one allocator
    issued_at: float = 0.0  # the issuer's clock when it was cleared, s
    turnover_s: float = math.inf  # about how long until the window's demand has turned over, s
    thin_rows: tuple = ()  # the window itself when it is thinner than THIN_WINDOW_ROWS
    log_sigma: float = 0.0  # single-spread policies (clear): the spread the window was cleared with
    reservation_share: float = 0.0  # theta: the share of log_price's price that is on a reserved token
    mean_cap_budget: float | None = None  # the bound on the mean cap it was cleared with (thin windows reuse it)

    @property
    def shadow_price(self) -> float:
        """The price of an expected generated token."""
        return math.exp(self.log_price) * (1.0 - self.reservation_share) if self.log_price > -math.inf else 0.0

    @property
    def reservation_price(self) -> float:
        """The price of a token held reserved (0: the caps fit)."""
        return math.exp(self.log_price) * self.reservation_share if self.log_price > -math.inf else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PriceQuote:
        d = dict(d)
        d["thin_rows"] = tuple(tuple(r) for r in d.get("thin_rows", ()))
        return cls(**d)


def _check_quotable(policy: Policy) -> None:
    if not isinstance(policy, (ClearCost, ClearCostEmpirical, ClearLognormal, Uniform)):
        raise InvalidInputError("policy", policy.name, f"decisions from a price quote support {QUOTABLE_POLICIES}")


def _row_width(policy: Policy) -> int:
    return 5 if policy.uses_lengths else 4  # + the length bin


def _lengths(policy: Policy, lengths, bins) -> EmpiricalLengths | None:
    """The histograms and each row's bin, for the policies that price them (checked)."""
    if not policy.uses_lengths:
        return None
    if not lengths:
        raise InvalidInputError("lengths", "()", f"{policy.name} needs the calibration's length histograms")
    return EmpiricalLengths(tuple(lengths), checked_length_bins(bins, len(lengths)))


def quote_window(policy: Policy, rows: np.ndarray, budget_per_query: float, context_limit_tokens: float | None,
                 *, lengths: tuple = (), mean_cap_budget: float | None = None, **meta) -> PriceQuote:
    """Clear the demand ``rows`` (threshold, spread, runaway share, weight per row; ``clear-cost-emp``: and
    the row's length bin, an index into ``lengths``, with the raw prediction as its threshold) at ``b`` per row.

    ``mean_cap_budget`` (``clear-cost-emp``; None: no bound): what each admitted cap may hold on average
    while requests are in flight; when the caps do not fit it, the quote carries the reservation share
    (module docstring). ``meta`` fills the quote's bookkeeping fields (version, issued_at, turnover_s).
    """
    _check_quotable(policy)
    rows = np.asarray(rows, dtype=float).reshape(-1, _row_width(policy))
    b = float(budget_per_query)
    thin = tuple(tuple(float(v) for v in r) for r in rows) if rows.shape[0] < THIN_WINDOW_ROWS else ()
    bound = float(mean_cap_budget) if (mean_cap_budget is not None and policy.uses_lengths) else None
    base = dict(policy=policy.name, budget_per_query_tokens=b, window_size=int(rows.shape[0]), thin_rows=thin,
                mean_cap_budget=bound, **meta)
    if isinstance(policy, Uniform) or rows.shape[0] == 0:
        # An empty window has no price: each request is then priced alone against b (caps_at_quote).
        return PriceQuote(log_price=-math.inf, log_fill_price=-math.inf, full_context=False, **base)
    tau, sig, rho, w = rows.T[:4]
    if policy.uses_lengths:
        res = clear_empirical_market(tau, b * tau.size, lengths=_lengths(policy, lengths, rows[:, 4]), weights=w,
                                     context_limit_tokens=context_limit_tokens, mean_cap_budget=bound)
        return PriceQuote(log_price=res.log_price, log_fill_price=res.log_fill_price,
                          full_context=res.full_context, reservation_share=res.reservation_share, **base)
    if isinstance(policy, ClearCost):
        res = clear_consumption_market(tau, b * tau.size, log_sigma=np.maximum(sig, SIGMA_MIN), runaway=rho,
                                       weights=w, context_limit_tokens=context_limit_tokens,
                                       fill_unused=policy.fill_unused)
        return PriceQuote(log_price=res.log_price, log_fill_price=res.log_fill_price,
                          full_context=res.full_context, **base)
    sigma = max(float(np.median(sig)), MIN_QUOTE_SIGMA)
    res = clear_market_lognormal(tau, b * tau.size, log_sigma=sigma, context_limit_tokens=context_limit_tokens,
                                 fill_unused=policy.fill_unused)
    log = (lambda p: math.log(p) if p > 0 else -math.inf)
    return PriceQuote(log_price=log(res.shadow_price), log_fill_price=log(res.fill_price), full_context=False,
                      log_sigma=sigma, **base)


def caps_at_quote(policy: Policy, quote: PriceQuote, thresholds, *, log_sigma=0.0, runaway=0.0, weights=None,
                  context_limit_tokens: float | None = None, length_bins=None, lengths: tuple = ()) -> np.ndarray:
    """Integer caps of requests at ``quote`` (0: insolvent at its shadow price); ``clear-cost-emp``: each
    request's length bin in ``length_bins``, an index into ``lengths``, and its raw prediction as threshold."""
    _check_quotable(policy)
    if quote.policy != policy.name:
        raise InvalidInputError("quote", quote.policy, f"was cleared by another policy than {policy.name}")
    tau = np.asarray(thresholds, dtype=float).reshape(-1)
    limit = math.inf if context_limit_tokens is None else float(context_limit_tokens)
    if isinstance(policy, Uniform):
        return np.full(tau.size, int(min(math.floor(quote.budget_per_query_tokens), limit)), dtype=np.int64)
    sig = np.broadcast_to(np.asarray(log_sigma, dtype=float), tau.shape)
    bins = None
    if policy.uses_lengths:
        bins = np.broadcast_to(np.asarray([] if length_bins is None else length_bins, dtype=float), tau.shape)
        _lengths(policy, lengths, bins)
    if quote.window_size < THIN_WINDOW_ROWS:
        # A thin window (a cold start): one request moves its price, so each request is cleared with the
        # window, as the central market does (its O(window) cost is small while the window is thin).
        rho = np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape)
        w = np.ones(tau.shape) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)
        extra = [()] * tau.size if bins is None else [(k,) for k in bins]
        return np.array([_cleared_with_window(policy, quote, (t, s, r, v, *e), context_limit_tokens, lengths)
                         for t, s, r, v, e in zip(tau, sig, rho, w, extra)], dtype=np.int64)
    if policy.uses_lengths:
        return caps_at_log_price_empirical(tau, lengths=_lengths(policy, lengths, bins), weights=weights,
                                           log_price=quote.log_price, full_context=quote.full_context,
                                           context_limit_tokens=context_limit_tokens,
                                           reservation_share=quote.reservation_share)
    if isinstance(policy, ClearCost):
        return caps_at_log_prices(tau, log_sigma=np.maximum(sig, SIGMA_MIN), runaway=runaway, weights=weights,
                                  log_price=quote.log_price, log_fill_price=quote.log_fill_price,
                                  full_context=quote.full_context, context_limit_tokens=context_limit_tokens)
    # clear prices one spread (the policy takes the median of the spreads): every request's best response
    # uses the spread its price was cleared with, so that price and caps describe the same market.
    return caps_at_prices(tau, log_sigma=max(quote.log_sigma, MIN_QUOTE_SIGMA), price=quote.shadow_price,
                          fill_price=math.exp(quote.log_fill_price) if quote.log_fill_price > -math.inf else 0.0,
                          context_limit_tokens=context_limit_tokens)


def _cleared_with_window(policy: Policy, quote: PriceQuote, row: tuple, context_limit_tokens, lengths=()) -> int:
    """The cap of ``row`` in a clearing of the quote's thin window plus ``row`` (the central market's rule)."""
    rows = np.asarray(quote.thin_rows + (tuple(float(v) for v in row),), dtype=float).reshape(-1, _row_width(policy))
    tau, sig, rho, w = rows.T[:4]
    budget = quote.budget_per_query_tokens * tau.size
    if policy.uses_lengths:
        alloc = policy.allocate(tau, budget, context_limit_tokens=context_limit_tokens, weights=w,
                                lengths=_lengths(policy, lengths, rows[:, 4]), mean_cap_budget=quote.mean_cap_budget)
    elif policy.per_query_sigma:
        alloc = policy.allocate(tau, budget, context_limit_tokens=context_limit_tokens, log_sigma=sig, runaway=rho,
                                weights=w)
    else:  # a single-spread policy clears with the arriving request's spread, as OnlineMarket does
        alloc = policy.allocate(tau, budget, context_limit_tokens=context_limit_tokens,
                                log_sigma=max(float(row[1]), MIN_QUOTE_SIGMA))
    return int(alloc.caps[-1])
