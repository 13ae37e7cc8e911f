"""The online market: the paper's market clearing for requests that arrive one by one.

:class:`OnlineMarket` turns one arriving request (a predicted threshold) into
a cap and a shadow price, or an abandonment, then reserves the cap in the
:class:`~clear_core.ledger.TokenLedger`. It answers a :class:`Decision`, whose
:class:`DecisionReason` says why. Each request is cleared against a rolling
window of recent demand plus itself, at the per-query budget pacing offers;
near the end of a per-query block its cap is bounded so that every later
arrival keeps its share; the cap is then checked against the real pool.

The market composes one piece per concern, each explained in its module:

* the pricing window, what each request brings, and which requests are new
  demand rather than retries: :mod:`clear_core.demand` ("Why a rolling
  window", "What each request brings", "Retries");
* the per-query budget ``b``, the cap / charge ratio and the end of a block:
  :mod:`clear_core.pacing` ("The per-query budget", "The end of a block");
* the caps in flight and the second budget they put on the caps:
  :mod:`clear_core.in_flight` ("Requests in flight");
* per-tenant counters and the owners' reports of them:
  :mod:`clear_core.tenants`;
* the decision, the check against the real pool and the retry advice of an
  abandonment: :mod:`clear_core.decision` ("Solvency against the real pool",
  "Retries").

With decisions at the ingress (:mod:`clear_core.lease`), replicas price from
this market's quotes (:meth:`OnlineMarket.quote`) and report what they decided;
the market absorbs their arrivals (:meth:`OnlineMarket.absorb`), their caps in
flight and their tenants' counters.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from clear_core.budget import Budget
from clear_core.decision import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    Decision,
    DecisionReason,
    abandonment,
    fit_to_pool,
    probe_cap,
    usable_cap,
    retry_advice,
)
from clear_core.demand import (
    ARRIVAL_MEMORY,
    ARRIVAL_MEMORY_S,
    DEFAULT_WINDOW_SIZE,
    ArrivalMemory,
    DemandWindow,
    check_request,
    reported_row,
    request_row,
)
from clear_core.errors import InvalidInputError
from clear_core.exploration import Exploration, ExplorationBooks
from clear_core.in_flight import InFlight
from clear_core.ledger import Settlement, TokenLedger
from clear_core.pacing import (
    BLOCK_RESERVE_SHARE,
    COST_WINDOW,
    DEFAULT_MIN_RATE_SPAN_S,
    MAX_CAP_COST_RATIO,
    MIN_COST_SAMPLES,
    Pacing,
)
from clear_core.policies import Policy
from clear_core.servable import SERVABLE_POLICIES, ServableMarket
from clear_core.tenants import (
    DEFAULT_TENANT,
    MAX_TENANTS,
    OTHER_TENANT,
    TENANT_COUNTERS,
    TENANT_MEMORY,
    TenantBooks,
    TenantStats,
)

# The names other code imports from here; the decision's, the demand's, pacing's and the tenants' are
# defined in their modules and re-exported.
__all__ = [
    "ARRIVAL_MEMORY", "ARRIVAL_MEMORY_S", "BLOCK_RESERVE_SHARE", "COST_WINDOW", "DEFAULT_MIN_RATE_SPAN_S",
    "DEFAULT_OUTCOME_WINDOW", "DEFAULT_TENANT", "DEFAULT_WINDOW_SIZE", "MAX_CAP_COST_RATIO", "MAX_RETRY_AFTER_S",
    "MAX_TENANTS", "MIN_COST_SAMPLES", "MIN_RETRY_AFTER_S", "OTHER_TENANT", "TENANT_COUNTERS", "TENANT_MEMORY",
    "ArrivalMemory", "Decision", "DecisionReason", "DemandWindow", "OnlineMarket", "TenantStats", "check_request",
    "retry_advice",
]

#: Recent decisions over which the abandonment rate is reported.
DEFAULT_OUTCOME_WINDOW = 200


def _servable(policy: Policy) -> ServableMarket:
    if not isinstance(policy, ServableMarket):
        raise InvalidInputError("policy", policy.name, f"the online market serves {', '.join(SERVABLE_POLICIES)}")
    return policy


@dataclass
class OnlineMarket:
    """Clears each arriving request against a rolling window of recent demand (module docstring).

    The settings are read when the market is built (its pieces keep them).
    """

    policy: Policy
    ledger: TokenLedger
    window_size: int = DEFAULT_WINDOW_SIZE  # recent thresholds the price is cleared against
    context_limit_tokens: int | None = None  # t_max for every cap
    min_rate_span_s: float = DEFAULT_MIN_RATE_SPAN_S
    pace: bool = True  # per-query budget: clear with the block's remaining budget per remaining arrival
    outcome_window: int = DEFAULT_OUTCOME_WINDOW
    tenant_weights: dict = field(default_factory=dict)  # tenant -> weight in the utility (others: 1)
    lengths: tuple = ()  # clear-cost-emp: the calibration's LengthHistograms that requests' length_bin index
    block_reserve: float = BLOCK_RESERVE_SHARE  # share of the paced budget each later arrival of a block keeps (0: off)
    exploration: Exploration | None = None  # probes of would-be-abandoned requests (clear_core.exploration)
    _window: DemandWindow = field(init=False, repr=False)  # demand rows of the recent arrivals (clear_core.demand)
    _outcomes: deque = field(init=False, repr=False)  # recent new arrivals: True where abandoned
    last_price: float = field(init=False, default=0.0)
    last_reservation_price: float = field(init=False, default=0.0)  # the second price (clear_core.in_flight)

    def __post_init__(self):
        if not (isinstance(self.window_size, int) and self.window_size >= 0):
            raise InvalidInputError("window_size", self.window_size, "must be an integer >= 0")
        self.market = _servable(self.policy)
        self.lengths = self.market.check_lengths(self.lengths)
        self._width = self.market.row_width
        self._window = DemandWindow(self.window_size, self._width)
        self._outcomes = deque(maxlen=self.outcome_window)
        self._arrivals = ArrivalMemory()
        self._pacing = Pacing(self.ledger, window_size=self.window_size, min_rate_span_s=self.min_rate_span_s,
                              pace=self.pace, block_reserve=self.block_reserve,
                              charges_generated_tokens=self.market.charges_generated_tokens)
        self._float = InFlight(self.ledger, window_size=self.window_size,
                               prices_reservations=self.policy.prices_reservations)
        self._quotes = 0
        self.last_quote = None
        self._last_share: float | None = None  # the last clearing's reservation share theta (a search hint)
        self._books = TenantBooks(self.tenant_weights)
        self.explored = ExplorationBooks()
        if not self.market.weights_tenants and any(w != 1.0 for w in self.tenant_weights.values()):
            raise InvalidInputError("tenant_weights", self.tenant_weights,
                                    f"{self.policy.name} does not weight queries (use clear-cost)")

    # -- the pieces' views (clear_core.tenants, .pacing, .in_flight) ---------------------

    @property
    def tenants(self) -> dict[str, TenantStats]:
        """tenant -> its counters (clear_core.tenants)."""
        return self._books.tenants

    def tenant_snapshot(self) -> dict:
        return self._books.snapshot()

    @property
    def budget(self) -> Budget:
        return self.ledger.budget

    @property
    def _costs(self) -> deque:
        """(cap, charged) of the recent settlements (the cap / charge ratio's sample)."""
        return self._pacing.costs

    def budget_per_query(self, now: float, ahead: bool = False) -> float:
        """b of the window market (:meth:`clear_core.pacing.Pacing.budget_per_query`).

        ``ahead``: for the next arrival, not yet counted (a quote prices requests still to come).
        """
        return self._pacing.budget_per_query(now, cap_cost_ratio=self.cap_cost_ratio(), ahead=ahead)

    def cap_cost_ratio(self) -> float:
        """Tokens of cap per token actually charged (:meth:`clear_core.pacing.Pacing.cap_cost_ratio`)."""
        return self._pacing.cap_cost_ratio()

    def block_bound(self, b: float, now: float) -> float | None:
        """The most one cap may hold near the end of a per-query block; None where it does not apply
        (:meth:`clear_core.pacing.Pacing.block_bound`)."""
        return self._pacing.block_bound(b, now)

    def arrival_rate(self, now: float) -> float:
        """Recent arrivals per second (over the window's arrival times)."""
        return self._pacing.arrival_rate(now)

    def concurrency(self) -> int:
        """Requests in flight the float is sized for (:meth:`clear_core.in_flight.InFlight.concurrency`)."""
        return self._float.concurrency()

    def in_flight(self) -> int:
        """Open reservations now: the ledger's and the leases' (as last reported)."""
        return self._float.in_flight()

    def mean_cap_budget(self, now: float) -> float | None:
        """What each admitted cap may hold on average, ``unspent / (K + 1)``; None when the policy does not
        price reservations or nothing is in flight (:meth:`clear_core.in_flight.InFlight.mean_cap_budget`)."""
        return self._float.mean_cap_budget(now)

    def abandonment_rate(self) -> float:
        return float(np.mean(self._outcomes)) if self._outcomes else 0.0

    def window(self) -> np.ndarray:
        """The recent thresholds the price is cleared against."""
        return self._window.rows()[:, 0]

    def turnover_s(self, now: float) -> float:
        """About how long until the demand the price is cleared against has turned over, s."""
        rate = self.arrival_rate(now)
        return len(self._window) / rate if rate > 0 else math.inf

    # -- deciding -----------------------------------------------------------------------

    def request(
        self,
        rid: str,
        threshold_tokens: float,
        *,
        log_sigma: float = 0.0,
        runaway: float = 0.0,
        tenant: str = DEFAULT_TENANT,
        client_cap_tokens: int | None = None,
        now: float | None = None,
        owner: str | None = None,
        arrival_key: str | None = None,
        retry: bool = False,
        length_bin: int | None = None,
        group: int = 1,
        floor_tokens: int = 1,
    ) -> Decision:
        """Price one arriving request, reserve its cap or abandon it.

        ``log_sigma`` and ``runaway`` describe the request's length
        distribution, ``tenant`` whose request it is (its weight and counters;
        :mod:`clear_core.demand`, "What each request brings"). ``client_cap_tokens``
        is the most the client accepts (its ``max_tokens`` within the context);
        the reserved cap never exceeds it. ``owner`` is whoever will settle the
        reservation (its lease, see the ledger); ``arrival_key`` and ``retry``
        recognise a retried request (:mod:`clear_core.demand`, "Retries").
        ``length_bin`` indexes ``lengths`` (``clear-cost-emp`` only;
        ``threshold_tokens`` is then the raw prediction the histogram is relative to). ``group`` and
        ``floor_tokens``: a group of choices decided as one, and the least cap worth reserving
        (:mod:`clear_core.decision`, "Groups and floors"; both already in the group's tokens).
        """
        now = self.ledger.now() if now is None else now
        entry = request_row(self.market, threshold_tokens, log_sigma=log_sigma, runaway=runaway,
                            weight=self._books.weight(tenant), length_bin=length_bin,
                            client_cap_tokens=client_cap_tokens, lengths=self.lengths)
        new = self._arrivals.is_new(arrival_key, retry, now)
        if new:
            self._arrive(now)
        b = self.budget_per_query(now)
        demand = self._window.with_row(entry)
        tau = demand[:, 0]
        alloc = self.market.clear_rows(demand, b * tau.size, context_limit_tokens=self.context_limit_tokens,
                                       lengths=self.lengths, mean_cap_budget=self.mean_cap_budget(now),
                                       share_hint=self._last_share)
        if self.window_size > 0 and new:
            self._window.append(entry)
        price = float(alloc.shadow_price) if math.isfinite(alloc.shadow_price) else 0.0
        self.last_price = price
        self.last_reservation_price = float(alloc.reservation_price)
        self._last_share = (alloc.reservation_price / (alloc.reservation_price + alloc.shadow_price)
                            if alloc.reservation_price > 0 else None)
        market_cap = int(alloc.caps[-1])
        bound = self.block_bound(b, now)
        if bound is not None and market_cap > bound:  # the end of a block (clear_core.pacing)
            market_cap = self.market.cap_within(alloc, entry, bound, context_limit_tokens=self.context_limit_tokens,
                                                lengths=self.lengths)
        cap = usable_cap(market_cap if client_cap_tokens is None else min(market_cap, int(client_cap_tokens)),
                         group, floor_tokens)
        quote = dict(
            market_cap_tokens=market_cap, shadow_price=price, reservation_price=self.last_reservation_price,
            threshold_tokens=float(threshold_tokens),
            budget_per_query_tokens=b, window_size=int(tau.size), new_arrival=new, tenant=tenant,
        )
        reason = DecisionReason.INSOLVENT
        if cap <= 0:
            cap = probe_cap(self.exploration, self.explored, rid, threshold_tokens, client_cap_tokens,
                            self.context_limit_tokens, self.ledger.available(now), group, floor_tokens)
            if cap <= 0:
                return self._abandon(DecisionReason.INSOLVENT, now, threshold_tokens, quote)
            reason = DecisionReason.EXPLORED
        else:
            reason, cap = fit_to_pool(cap, self.ledger.available(now), threshold_tokens, group, floor_tokens)
        if reason is DecisionReason.POOL_EMPTY:
            return self._abandon(reason, now, math.ceil(threshold_tokens), quote)
        self.ledger.reserve(rid, cap, now, owner=owner)
        self._books.admitted(rid, tenant, cap, new_arrival=new)
        self.explored.admitted(rid, cap, reason is DecisionReason.EXPLORED)
        if new:
            self._outcomes.append(False)
        return Decision(reason=reason, cap_tokens=cap, **quote)

    def settle(self, rid: str, generated: int, *, failed: bool = False) -> Settlement:
        """End a request in the ledger and remember what its cap really cost."""
        s = self.ledger.settle(rid, generated, failed=failed)
        if not failed:
            self._pacing.settled(s)
        self._books.settled(rid, s)
        self.explored.settled(rid, s.generated)
        return s

    def correct(self, rid: str, received: int) -> Settlement | None:
        """A settled request's client received only ``received`` tokens (TokenLedger.correct)."""
        return self.ledger.correct(rid, received)

    def _arrive(self, now: float) -> None:
        """Count a new arrival: it credits the budget (a per-query block), the arrival rate and the float."""
        self.ledger.arrive()
        self._pacing.arrived(now)
        self._float.arrived()

    def _abandon(self, reason: DecisionReason, now: float, need: float, quote: dict) -> Decision:
        if quote["new_arrival"]:
            self._outcomes.append(True)
            self._books.abandoned(quote["tenant"])
        # Insolvent: the price moves only as the demand it is cleared against turns over. Pool empty:
        # the refill time (inf: no refill will cover it, per-query blocks).
        refill = self.ledger.seconds_until(need, now) if reason is DecisionReason.POOL_EMPTY else math.inf
        return abandonment(reason, quote, self.turnover_s(now), refill)

    # -- memory across restarts ---------------------------------------------------------

    def snapshot(self) -> dict:
        """Pricing memory (recent thresholds and outcomes) and the newest arrival keys (to tell a retry from a new
        arrival), for an allocator restart."""
        return {"window": [list(w) for w in self._window], "outcomes": [bool(x) for x in self._outcomes],
                "last_price": self.last_price, "tenants": self._books.snapshot(),
                "owner_tenants": self._books.owner_snapshot(),
                "arrival_keys": self._arrivals.snapshot(self.ledger.now())}

    def seed(self, thresholds, bins=None) -> None:
        """Prime the pricing window with thresholds of representative past demand.

        At a cold start the window is empty and the first requests would be
        priced against themselves alone; a seed (e.g. the predictions of a
        recent traffic sample) prices them against realistic demand from the
        first request on. Arrivals then push the seed out of the window.
        ``bins``: each threshold's length bin (policies that price histograms).
        """
        values = [float(x) for x in thresholds]
        if any(not (math.isfinite(v) and v >= 0) for v in values):
            raise InvalidInputError("pricing window seed", values[:5], "thresholds must be finite and >= 0")
        if not self.market.prices_length_histograms:
            self._window.extend(self.market.demand_row(v, 0.0, 0.0, 1.0) for v in values)
            return
        which = [] if bins is None else [int(b) for b in bins]
        if len(which) != len(values) or any(not 0 <= b < len(self.lengths) for b in which):
            raise InvalidInputError("pricing window seed", "bins", f"{self.policy.name} needs each row's length bin "
                                    f"(an index into {len(self.lengths)} histograms)")
        self._window.extend(self.market.demand_row(v, 0.0, 0.0, 1.0, b) for v, b in zip(values, which))

    def restore(self, snap: dict) -> None:
        for x in snap.get("window", []):  # a threshold (older snapshots) or (threshold, spread, runaway, weight[, bin])
            row = (float(x), 0.0, 0.0, 1.0) if isinstance(x, (int, float)) else tuple(float(v) for v in x)
            if len(row) != self._width:  # another policy's window: its rows do not fit this market
                continue
            self._window.append(row)
        self._books.restore(snap.get("tenants", {}), snap.get("owner_tenants", {}))
        self._outcomes.extend(bool(x) for x in snap.get("outcomes", []))
        self.last_price = float(snap.get("last_price", 0.0))
        self._arrivals.restore(snap.get("arrival_keys", []), self.ledger.now())  # a retry after a restart is one

    # -- decisions at the ingress (budget leases, clear_core.lease) ---------------------

    def absorb(self, rows, now: float | None = None) -> None:
        """New arrivals priced elsewhere (an ingress replica's report): each row is
        ``(threshold, spread, runaway share, weight)``, and its length bin for a
        policy that prices histograms. They credit the budget (per-query
        blocks), enter the pricing window and the arrival rate."""
        now = self.ledger.now() if now is None else now
        for row in rows:
            entry = reported_row(self.market, row, self.lengths)
            self._arrive(now)
            if self.window_size > 0:
                self._window.append(entry)

    def absorb_in_flight(self, owner: str, open_reservations: int) -> None:
        """An ingress replica's open reservations inside its lease (its report), for :meth:`concurrency`."""
        self._float.absorb(owner, open_reservations)

    def absorb_tenants(self, owner: str, counters: dict) -> None:
        """An owner's cumulative per-tenant counters; the change since its last report is added
        (its new admissions and abandonments enter the abandonment rate)."""
        for admitted, abandoned in self._books.absorb(owner, counters):
            self._outcomes.extend([False] * min(admitted, self.outcome_window))
            self._outcomes.extend([True] * min(abandoned, self.outcome_window))

    def reporting_owners(self) -> list[str]:
        return self._books.owners()

    def forget_owner(self, owner: str) -> None:
        self._books.forget_owner(owner)
        self._float.forget_owner(owner)

    def quote(self, now: float | None = None):
        """Clear the pricing window at the current per-query budget: a :class:`~clear_core.quotes.PriceQuote`."""
        from clear_core.quotes import quote_window

        now = self.ledger.now() if now is None else now
        self._quotes += 1
        # clear-cost-emp quotes carry the reservation price too (clear_core.quotes); the others price
        # expected tokens only.
        bound = self.mean_cap_budget(now)
        q = quote_window(self.policy, self._window.rows(), self.budget_per_query(now, ahead=True),
                         self.context_limit_tokens, lengths=tuple(self.lengths), mean_cap_budget=bound,
                         version=self._quotes, issued_at=now, turnover_s=self.turnover_s(now))
        self.last_price = q.shadow_price
        self.last_reservation_price = q.reservation_price
        self.last_quote = q
        return q
