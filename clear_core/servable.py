"""The markets a deployment can serve, behind one interface.

A served policy answers requests one at a time, in two ways that must agree
(:mod:`clear_core.online_market` and :mod:`clear_core.lease`):

* **central**: the allocator clears a window of recent demand plus the
  arriving request (:meth:`ServableMarket.clear_rows`) and the request gets
  its cap from that clearing;
* **at the ingress**: the allocator clears the window alone and publishes its
  prices (:meth:`ServableMarket.quote_prices`, carried by a
  :class:`clear_core.quotes.PriceQuote`); an ingress replica answers each
  request with its best response at those prices
  (:meth:`ServableMarket.caps_at_prices`), without seeing anybody else.

Both read the same **demand rows**, one per request::

    (threshold tokens, log-space spread, runaway share, weight[, length bin])

A market prices a zero spread (exact thresholds) the same way in both modes:
``clear`` clears the paper's surge market, and its quote carries that
market's price, fill price and decay rate; the markets on expected generated
tokens price the narrowest spread of their grid
(:data:`clear_core.consumption.SIGMA_MIN`). The
length bin is there for the markets that price the calibration's length
histograms (``clear-cost-emp``): an index into the histograms the caller
passes as ``lengths``.

Exactly four policies are servable (:data:`SERVABLE_POLICIES`); the paper's
other baselines and the hindsight policies (``oracle``, ``uniform-generated``)
are offline bench policies, and :func:`servable_policy` refuses them. The
``auto`` policy of a deployment resolves in :func:`resolve_auto`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clear_core.errors import InvalidInputError

if TYPE_CHECKING:
    from clear_core.policies import Allocation

#: The policies a deployment serves, with both decision modes (central and ingress).
SERVABLE_POLICIES = ("uniform", "clear", "clear-cost", "clear-cost-emp")
#: Columns of a demand row; markets that price length histograms add the bin.
ROW_COLUMNS = ("threshold_tokens", "log_sigma", "runaway", "weight")


@dataclass(frozen=True)
class MarketPrices:
    """What a clearing of a window says to a request that was not in it (a quote's prices)."""

    log_price: float  # ln shadow price at which solvency is decided; -inf: no price
    log_fill_price: float  # ln price the solvent requests' caps are set at (<= log_price); -inf: none
    full_context: bool  # abundant: every request gets the context limit
    reservation_share: float = 0.0  # theta: the share of the price that is on a token held reserved
    log_sigma: float = 0.0  # single-spread markets: the spread the window was cleared with
    beta: float = float("nan")  # the paper's surge market (a zero spread): the decay rate it was cleared with


NO_PRICE = MarketPrices(log_price=-np.inf, log_fill_price=-np.inf, full_context=False)


class ServableMarket(ABC):
    """A policy that prices requests one at a time against recent demand (module docstring).

    Besides the three methods below, a servable market declares two facts a
    deployment checks when it is built: :attr:`charges_generated_tokens` (its
    budget is one of expected generated tokens, so it needs a budget that
    refunds unused caps) and :attr:`weights_tenants` (tenants' weights change
    its prices); and :attr:`prices_length_histograms` (its rows carry a length
    bin and every call needs the calibration's histograms as ``lengths``).
    """

    name: str
    #: Its budget counts expected generated tokens, not caps (it needs a refunding budget).
    charges_generated_tokens: bool = False
    #: Tenant weights (the paper's alpha_i) change its prices; the others refuse unequal weights.
    weights_tenants: bool = False
    #: Its rows carry a length bin, an index into the calibration's length histograms (``lengths``).
    prices_length_histograms: bool = False

    @property
    def row_width(self) -> int:
        """Values in one demand row (module docstring)."""
        return len(ROW_COLUMNS) + int(self.prices_length_histograms)

    def demand_row(self, threshold_tokens: float, log_sigma: float, runaway: float, weight: float,
                   length_bin: int | None = None) -> tuple:
        """One request's demand row (module docstring)."""
        row = (float(threshold_tokens), float(log_sigma), float(runaway), float(weight))
        if self.prices_length_histograms:
            if length_bin is None:
                raise InvalidInputError("length_bin", None, f"{self.name} prices a length bin per request")
            row += (float(length_bin),)
        return row

    def check_lengths(self, lengths) -> tuple:
        """The calibration's histograms this market needs (``()`` for markets that price none)."""
        if not self.prices_length_histograms:
            return ()
        if not lengths:
            raise InvalidInputError("lengths", "()", f"{self.name} needs the calibration's length histograms")
        return tuple(lengths)

    @abstractmethod
    def clear_rows(self, rows: np.ndarray, budget: float, *, context_limit_tokens: float | None,
                   lengths: tuple = (), mean_cap_budget: float | None = None,
                   share_hint: float | None = None) -> Allocation:
        """Clear ``rows`` (an ``(n, row_width)`` array of demand rows) under ``budget`` tokens.

        Returns the :class:`~clear_core.policies.Allocation` of the batch: one
        integer cap per row (0: abandoned, insolvent at the shadow price), the
        shadow price and, for markets that price reservations, the price of a
        token held reserved. The *last* row is the arriving request: a market
        that prices one spread for everybody clears with that row's spread.
        ``mean_cap_budget`` bounds the mean admitted cap (what each request in
        flight may hold reserved); a market that does not price reservations
        ignores it. ``share_hint`` is where a search for the reservation share
        starts (the previous clearing's).
        """

    @abstractmethod
    def quote_prices(self, rows: np.ndarray, budget: float, *, context_limit_tokens: float | None,
                     lengths: tuple = (), mean_cap_budget: float | None = None) -> MarketPrices:
        """Clear ``rows`` under ``budget`` and return the prices that make the clearing decentralised.

        A request of the cleared window that takes its best response at these
        prices (:meth:`caps_at_prices`) gets back the cap the clearing gave
        it; a new request drawn from the same demand gets the cap the window
        market would have given it, up to its own weight in the window.
        """

    @abstractmethod
    def caps_at_prices(self, prices: MarketPrices, rows: np.ndarray, *, budget_per_query: float,
                       context_limit_tokens: float | None, lengths: tuple = ()) -> np.ndarray:
        """Each row's integer cap at ``prices``, one request at a time (0: insolvent at the shadow price).

        ``budget_per_query`` is the ``b`` the prices were cleared with (a market
        without a price, such as uniform caps, answers with it).
        """

    def cap_within(self, alloc: Allocation, row: tuple, bound: float, *, context_limit_tokens: float | None,
                   lengths: tuple = ()) -> int:
        """The arriving request's best cap at ``alloc``'s prices among the caps up to ``bound`` (0: none
        is worth its price). Markets with a closed-form best response override it; the default keeps the
        cleared cap when it fits and abandons the request otherwise."""
        cap = int(alloc.caps[-1])
        return cap if cap <= bound else 0


def servable_policy(spec: str, *, field: str = "policy") -> ServableMarket:
    """The servable market of a policy spec (``name`` or ``name:key=value``); a bench-only policy is
    refused with an error naming ``field``."""
    from clear_core.policies import parse_policy

    name = spec.partition(":")[0].strip()
    if name not in SERVABLE_POLICIES:
        raise InvalidInputError(field, spec, f"is an offline bench policy; a deployment serves one of "
                                f"{', '.join(SERVABLE_POLICIES)} (or auto)")
    policy = parse_policy(spec)
    assert isinstance(policy, ServableMarket), policy
    return policy


def resolve_auto(*, refunds_unused: bool, has_length_histograms: bool) -> str:
    """The policy ``auto`` stands for: the market of what the budget charges.

    A budget that refunds unused caps charges generated tokens, so it gets a
    market on expected generated tokens: ``clear-cost-emp`` where the
    predictor's calibration has length histograms (the shipped minilm-ridge
    head has), else ``clear-cost``. A budget of caps (the paper's semantics)
    gets ``clear``.
    """
    if not refunds_unused:
        return "clear"
    return "clear-cost-emp" if has_length_histograms else "clear-cost"
