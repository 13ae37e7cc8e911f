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
  reservation may hold on average, ``mean_cap_budget``; :mod:`clear_core.in_flight`), and its two prices travel as one price ``nu = exp(log_price)`` on
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
(log-normal cap market; a zero spread is the paper's surge market, quoted with its decay rate)
and ``uniform`` (no price: every request gets the per-query budget).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.policies import Policy
from clear_core.servable import NO_PRICE, SERVABLE_POLICIES, MarketPrices, ServableMarket

#: Every servable market quotes (clear_core.servable).
QUOTABLE_POLICIES = SERVABLE_POLICIES
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
    beta: float = math.nan  # clear with a zero spread (the paper's surge market): its decay rate
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


def _market(policy) -> ServableMarket:
    if not isinstance(policy, ServableMarket):
        raise InvalidInputError("policy", policy.name, f"decisions from a price quote support {QUOTABLE_POLICIES}")
    return policy


def _rows(market: ServableMarket, thresholds, log_sigma, runaway, weights, length_bins) -> np.ndarray:
    """Demand rows of requests given column by column."""
    tau = np.asarray(thresholds, dtype=float).reshape(-1)
    cols = [tau, np.broadcast_to(np.asarray(log_sigma, dtype=float), tau.shape),
            np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape),
            np.ones(tau.shape) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)]
    if market.prices_length_histograms:
        cols.append(np.broadcast_to(np.asarray([] if length_bins is None else length_bins, dtype=float), tau.shape))
    return np.stack(cols, axis=1) if tau.size else np.zeros((0, market.row_width))


def quote_window(policy: Policy, rows: np.ndarray, budget_per_query: float, context_limit_tokens: float | None,
                 *, lengths: tuple = (), mean_cap_budget: float | None = None, **meta) -> PriceQuote:
    """Clear the demand ``rows`` (:mod:`clear_core.servable`: threshold, spread, runaway share, weight per
    row, and the length bin for ``clear-cost-emp``, whose threshold is the raw prediction) at ``b`` per row.

    ``mean_cap_budget`` (``clear-cost-emp``; None: no bound): what each admitted cap may hold on average
    while requests are in flight; when the caps do not fit it, the quote carries the reservation share
    (module docstring). ``meta`` fills the quote's bookkeeping fields (version, issued_at, turnover_s).
    """
    market = _market(policy)
    rows = np.asarray(rows, dtype=float).reshape(-1, market.row_width)
    b = float(budget_per_query)
    thin = tuple(tuple(float(v) for v in r) for r in rows) if rows.shape[0] < THIN_WINDOW_ROWS else ()
    bound = float(mean_cap_budget) if (mean_cap_budget is not None and market.prices_length_histograms) else None
    base = dict(policy=market.name, budget_per_query_tokens=b, window_size=int(rows.shape[0]), thin_rows=thin,
                mean_cap_budget=bound, **meta)
    # An empty window has no price: each request is then priced alone against b (caps_at_quote).
    prices = NO_PRICE if rows.shape[0] == 0 else market.quote_prices(
        rows, b * rows.shape[0], context_limit_tokens=context_limit_tokens, lengths=market.check_lengths(lengths),
        mean_cap_budget=bound)
    return PriceQuote(log_price=prices.log_price, log_fill_price=prices.log_fill_price,
                      full_context=prices.full_context, reservation_share=prices.reservation_share,
                      log_sigma=prices.log_sigma, beta=prices.beta, **base)


def caps_at_quote(policy: Policy, quote: PriceQuote, thresholds, *, log_sigma=0.0, runaway=0.0, weights=None,
                  context_limit_tokens: float | None = None, length_bins=None, lengths: tuple = ()) -> np.ndarray:
    """Integer caps of requests at ``quote`` (0: insolvent at its shadow price); ``clear-cost-emp``: each
    request's length bin in ``length_bins``, an index into ``lengths``, and its raw prediction as threshold."""
    market = _market(policy)
    if quote.policy != market.name:
        raise InvalidInputError("quote", quote.policy, f"was cleared by another policy than {market.name}")
    rows = _rows(market, thresholds, log_sigma, runaway, weights, length_bins)
    lengths = market.check_lengths(lengths)  # each row's bin is checked where the market reads it
    if quote.window_size < THIN_WINDOW_ROWS:
        # A thin window (a cold start): one request moves its price, so each request is cleared with the
        # window, as the central market does (its O(window) cost is small while the window is thin).
        return np.array([_cleared_with_window(market, quote, tuple(r), context_limit_tokens, lengths)
                         for r in rows], dtype=np.int64)
    prices = MarketPrices(log_price=quote.log_price, log_fill_price=quote.log_fill_price,
                          full_context=quote.full_context, reservation_share=quote.reservation_share,
                          log_sigma=quote.log_sigma, beta=quote.beta)
    return market.caps_at_prices(prices, rows, budget_per_query=quote.budget_per_query_tokens,
                                 context_limit_tokens=context_limit_tokens, lengths=lengths)


def _cleared_with_window(market: ServableMarket, quote: PriceQuote, row: tuple, context_limit_tokens,
                         lengths=()) -> int:
    """The cap of ``row`` in a clearing of the quote's thin window plus ``row`` (the central market's rule)."""
    rows = np.asarray(quote.thin_rows + (row,), dtype=float).reshape(-1, market.row_width)
    alloc = market.clear_rows(rows, quote.budget_per_query_tokens * rows.shape[0],
                              context_limit_tokens=context_limit_tokens, lengths=lengths,
                              mean_cap_budget=quote.mean_cap_budget)
    return int(alloc.caps[-1])
