"""The online market: the paper's market clearing for requests that arrive one by one.

:class:`OnlineMarket` turns one arriving request (a predicted threshold) into
a cap and a shadow price, or an abandonment, then reserves the cap in the
:class:`~clear_core.ledger.TokenLedger`. It answers a :class:`Decision`, whose
:class:`DecisionReason` says why.

Why a rolling window
--------------------
Requests arrive one by one, so a market with only the requests currently in
flight is *thin*: a lone request would always clear at price 0 and get its
peak. The market keeps the last ``window_size`` predicted thresholds it has
seen (admitted or not) and clears the market of ``window + [new request]``
with budget ``b * (len(window) + 1)`` (the paper's batch problem, Eq. 14, on a
sample of recent demand); the new request gets its cap from that clearing and
the market's shadow price is the price quoted. When traffic is stationary the
window is a sample of the same distribution as the batch, so the clearing
price and every cap converge to those of the offline batch (the per-query
budget and the threshold distribution are what fix the price). The per-query
budget ``b`` is the budget's (:meth:`clear_core.budget.Budget.pricing_budget_per_query`):
a per-query budget's ``b`` (paced over its block), or what a token bucket's
refill rate buys at the recent arrival rate, ``b = tokens_per_s * span / n``
over the window's arrivals (``span`` floored at ``min_rate_span_s``).

What each request brings
------------------------
A request brings its predicted threshold and, for the policies that price a
length *distribution* (``clear-cost``, :mod:`clear_core.consumption`), its
calibrated spread and runaway share, and its tenant's weight (the paper's
alpha_i of Eq. 2: a tenant worth more buys tokens first at the same price).
The window keeps all four, so the clearing sees the recent demand as it was.
``clear-cost-emp`` (:mod:`clear_core.empirical_market`) prices each request's
*empirical* length histogram instead: the market holds the calibration's
histograms (``lengths``), each request names its bin (``length_bin``) and the
window keeps it as a fifth column.
``clear-cost`` clears a budget of *expected generated tokens*, so the window
market uses the budget's per-query ``b`` as it is; the paper's cap policies
clear caps, and in a refunding budget ``b`` is scaled by the measured
cap / charge ratio (:meth:`OnlineMarket.cap_cost_ratio`). Either way the
ledger reserves whole caps: reservation = cap, price = expected cost, so the
invariant ``reserved + spent <= granted`` is untouched.

Requests in flight
------------------
A reserved cap comes back, mostly, as a refund when its request settles, but
while it is in flight it is out of the pool. With ``K`` requests in flight
the unspent pool (:meth:`~clear_core.ledger.TokenLedger.unspent`) has to
hold ``K + 1`` caps at a time, and caps that ignore this *float* run the pool
dry: an abundant price gives caps at the context limit, a few dozen of them
hold the whole block, and the next requests are cut or abandoned for want of
reservable tokens rather than because they are insolvent. A policy that
``prices_reservations`` (``clear-cost``, ``clear-cost-emp``) clears the
window with a second budget: its admitted caps may average at most
``unspent / (K + 1)``, ``K`` the most open reservations seen at a recent
arrival (so a dip in concurrency does not loosen it). That is a second price,
on a token held reserved, which shortens the caps of the requests a long cap
buys little for (:mod:`clear_core.empirical_market`, "A second budget").

Pacing still counts the open caps as spent. Counting them at the tokens they
are expected to generate instead (they mostly come back) spends a little
more of a block when requests arrive at their own pace, but with
closed-loop clients it fails: the first burst is priced as if the refunds
were already back, takes the whole block in a few dozen caps, and every
request that arrives while they run is abandoned at once, so the clients
burn through their queries (README, "Requests in flight").

The end of a block
------------------
The window market prices expected tokens, which is right while many
arrivals share what is left of a per-query block: one generation that runs
to its cap moves the paced budget of each of the others a little. Near the
block's end a handful of arrivals share it, and one long cap (with the
block underspent, pacing offers the last arrivals a generous ``b``) can take
what all of them needed: in the bench's streams, the last arrivals of a
block were abandoned after one request 10 arrivals from the end reserved
5,547 of the 7,250 tokens left (and generated all of them). So in a
per-query block (paced) a cap may hold at most what leaves every later
arrival of the block :data:`BLOCK_RESERVE_SHARE` of the paced budget,
``available - share * (arrivals still to come) * b``; a request whose
market cap is larger gets its best response at the clearing's prices among
the caps within that bound (:func:`clear_core.empirical_market.caps_at_log_price_empirical`
with the bound as its context limit), or is abandoned as insolvent when no
cap within it is worth its price. Well inside a block the bound is about
half the pool and never binds. It applies to the markets that price length
histograms (``clear-cost-emp``, the serving default; the others keep their
cap), and not to a token bucket, which refills instead of ending. It is
the allocator's rule for its own decisions: with ``decisions: ingress`` the
replicas price from quotes against their leases (:mod:`clear_core.lease`),
and a lease is at most a quarter of what is left of the pool.

Tenants
-------
Per-tenant counters (:class:`TenantStats`: admitted, abandoned, tokens
allocated and generated) are kept for the tenants the market is told about.

Solvency against the real pool
------------------------------
The market's cap is then checked against the ledger: if it does not fit the
available budget, it is cut to what is available when that still reaches the
request's predicted threshold (``CUT_TO_AVAILABLE``), and the request is
abandoned otherwise (``POOL_EMPTY``). A request whose market cap is 0 is
insolvent at the shadow price (``INSOLVENT``): an operator acts differently on
the two abandonments (the first says the price is high, the second that the
pool is drained).

Retries
-------
A retry is not new demand. A request may carry an *arrival key* (the client's
``Idempotency-Key``, or a fingerprint of its body); a request marked as a
retry whose key arrived within the last ``ARRIVAL_MEMORY_S`` is priced again
but is not a new arrival: it credits no per-query budget and does not enter
the pricing window, the arrival rate or the abandonment rate a second time.

An abandonment says when a retry could succeed and whether to retry at all
(:attr:`Decision.should_retry`): a request insolvent at the shadow price stays
insolvent until the demand the price was cleared against has turned over
(about ``window / arrival rate``), so it is told not to retry soon; a solvent
request refused by an empty pool is told to come back after the refill time
when a refill will cover it.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from clear_core.budget import Budget, PerQueryBudget
from clear_core.empirical_market import checked_length_bins
from clear_core.errors import InvalidInputError
from clear_core.ledger import Settlement, TokenLedger
from clear_core.policies import Policy
from clear_core.servable import SERVABLE_POLICIES, ServableMarket

#: Abandoned requests are retried after at least this long, and are told at most this long (HTTP Retry-After).
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 3600.0
#: Arrival keys remembered to recognise retries: how many, and for how long, s.
ARRIVAL_MEMORY = 8192
ARRIVAL_MEMORY_S = 600.0
#: Recent thresholds each request is priced against (the pricing window).
DEFAULT_WINDOW_SIZE = 256
#: Floor of the arrival span used to estimate the arrival rate of a token bucket.
DEFAULT_MIN_RATE_SPAN_S = 1.0
#: Recent decisions over which the abandonment rate is reported.
DEFAULT_OUTCOME_WINDOW = 200
#: Refunds to the pool: settlements over which the cap / charge ratio is measured,
#: how many are needed before it is used, and its ceiling.
COST_WINDOW = 256
MIN_COST_SAMPLES = 20
MAX_CAP_COST_RATIO = 8.0
#: At the end of a per-query block, each later arrival keeps at least this share of the paced budget
#: (module docstring, "The end of a block"); chosen on the bench's served streams (README).
BLOCK_RESERVE_SHARE = 0.5


#: Requests whose tenant is remembered until they settle (older ones are forgotten first).
TENANT_MEMORY = 65536
DEFAULT_TENANT = "default"
#: Tenants counted by name (configured ones always); the rest are counted together as OTHER_TENANT.
MAX_TENANTS = 256
OTHER_TENANT = "other"


@dataclass
class TenantStats:
    """What one tenant's requests got from the market (counters since the allocator started)."""

    weight: float = 1.0  # the tenant's weight in the utility
    admitted: int = 0  # requests admitted (new arrivals)
    abandoned: int = 0  # requests abandoned (new arrivals)
    allocated_tokens: int = 0  # caps reserved
    generated_tokens: int = 0  # tokens charged at settlement

    def as_dict(self) -> dict:
        return {"weight": self.weight, "admitted": self.admitted, "abandoned": self.abandoned,
                "allocated_tokens": self.allocated_tokens, "generated_tokens": self.generated_tokens}


class DemandWindow:
    """The last ``size`` arrivals' (threshold, spread, runaway share, weight), in a numpy ring buffer.

    Every request is priced against the whole window, so reading it must be a
    copy of one array, not a walk over Python objects.
    """

    def __init__(self, size: int, width: int = 4):
        self.size = int(size)
        self.width = int(width)
        self._rows = np.zeros((max(self.size, 1), self.width))
        self._next = 0  # where the next row goes
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return iter(tuple(float(v) for v in row) for row in self.rows())

    def append(self, row) -> None:
        if self.size == 0:
            return
        self._rows[self._next] = row
        self._next = (self._next + 1) % self.size
        self._count = min(self._count + 1, self.size)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def rows(self) -> np.ndarray:
        """The window's rows, oldest first (a copy)."""
        if self._count < self.size:
            return self._rows[: self._count].copy()
        return np.concatenate([self._rows[self._next:], self._rows[: self._next]])

    def with_row(self, row) -> np.ndarray:
        """The window's rows and one more at the end (the arriving request)."""
        out = np.empty((self._count + 1, self.width))
        if self._count < self.size:
            out[: self._count] = self._rows[: self._count]
        else:
            k = self.size - self._next
            out[:k] = self._rows[self._next:]
            out[k: self._count] = self._rows[: self._next]
        out[-1] = row
        return out


class ArrivalMemory:
    """Arrival keys seen recently, to tell a retry from new demand (module docstring, Retries)."""

    def __init__(self):
        self._keys: OrderedDict[str, float] = OrderedDict()  # arrival key -> clock time of its first arrival

    def is_new(self, key: str | None, retry: bool, now: float) -> bool:
        """Remember ``key``; a retry of a key seen within ARRIVAL_MEMORY_S is not a new arrival."""
        keys = self._keys
        while keys and (len(keys) > ARRIVAL_MEMORY or now - next(iter(keys.values())) > ARRIVAL_MEMORY_S):
            keys.popitem(last=False)
        if key is None:
            return True
        if retry and key in keys:
            return False
        keys[key] = now
        keys.move_to_end(key)
        return True


def check_request(threshold_tokens: float, log_sigma: float, runaway: float, client_cap_tokens: int | None) -> None:
    """Refuse a request the market cannot price (InvalidInputError)."""
    if not (math.isfinite(threshold_tokens) and threshold_tokens >= 0):
        raise InvalidInputError("threshold_tokens", threshold_tokens, "must be finite and >= 0")
    if not (math.isfinite(log_sigma) and log_sigma >= 0):
        raise InvalidInputError("log_sigma", log_sigma, "must be finite and >= 0")
    if not (math.isfinite(runaway) and 0 <= runaway < 1):
        raise InvalidInputError("runaway", runaway, "must be in [0, 1)")
    if client_cap_tokens is not None and client_cap_tokens < 1:
        raise InvalidInputError("client_cap_tokens", client_cap_tokens, "must be >= 1")


def retry_advice(reason: "DecisionReason", turnover_s: float, refill_s: float) -> tuple[float, bool]:
    """(Retry-After, should retry) of an abandonment: insolvent waits for the demand to turn over
    and is told not to retry soon; a solvent request refused by an empty pool waits for the refill."""
    if reason is DecisionReason.INSOLVENT:
        wait, should = turnover_s, False
    else:
        wait = refill_s
        should = math.isfinite(wait)
    retry = MAX_RETRY_AFTER_S if not math.isfinite(wait) else min(max(MIN_RETRY_AFTER_S, wait), MAX_RETRY_AFTER_S)
    return float(retry), should


class DecisionReason(str, enum.Enum):
    """Why the market decided what it did; the values are stable (metric labels, error bodies)."""

    ADMITTED = "admitted"  # the market's cap fits the pool
    CUT_TO_AVAILABLE = "cut_to_available"  # admitted with the pool's remainder (still >= the threshold)
    INSOLVENT = "insolvent"  # abandoned: cannot pay back its cost at the shadow price
    POOL_EMPTY = "pool_empty"  # abandoned: solvent, but the pool cannot cover its threshold

    @property
    def admitted(self) -> bool:
        return self in (DecisionReason.ADMITTED, DecisionReason.CUT_TO_AVAILABLE)


@dataclass(frozen=True)
class Decision:
    """What the market decided for one request (passed from the allocator to the ingress)."""

    reason: DecisionReason  # admitted, cut, or why it was abandoned
    cap_tokens: int  # reserved completion cap (0 when abandoned)
    market_cap_tokens: int  # the window market's cap before the client's cap and the pool check
    shadow_price: float  # clearing price of the window market (utility per token)
    threshold_tokens: float  # predicted threshold tau_hat
    budget_per_query_tokens: float  # per-query budget the window market was cleared with
    retry_after_s: float = 0.0  # abandoned: when a retry may succeed, s
    window_size: int = 0  # thresholds the price was cleared against (window + this one)
    should_retry: bool = False  # abandoned: whether a retry after retry_after_s is worth it
    new_arrival: bool = True  # False: a retry of a recent arrival (no new budget, not re-counted)
    tenant: str = DEFAULT_TENANT  # whose request it was (the tenant's counters)
    reservation_price: float = 0.0  # price of a token held reserved (0: the open caps fit; module docstring)

    @property
    def admitted(self) -> bool:
        return self.reason.admitted


def _servable(policy: Policy) -> ServableMarket:
    if not isinstance(policy, ServableMarket):
        raise InvalidInputError("policy", policy.name, f"the online market serves {', '.join(SERVABLE_POLICIES)}")
    return policy


@dataclass
class OnlineMarket:
    """Clears each arriving request against a rolling window of recent demand (module docstring)."""

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
    _window: DemandWindow = field(init=False, repr=False)  # (threshold, spread, runaway share, weight) per arrival
    _times: deque = field(init=False, repr=False)
    _outcomes: deque = field(init=False, repr=False)
    _costs: deque = field(init=False, repr=False)
    _arrivals: ArrivalMemory = field(init=False, repr=False)
    last_price: float = field(init=False, default=0.0)
    last_reservation_price: float = field(init=False, default=0.0)  # the second price (module docstring)

    def __post_init__(self):
        if not (isinstance(self.window_size, int) and self.window_size >= 0):
            raise InvalidInputError("window_size", self.window_size, "must be an integer >= 0")
        self.market = _servable(self.policy)
        self.lengths = self.market.check_lengths(self.lengths)
        self._width = self.market.row_width
        self._window = DemandWindow(self.window_size, self._width)
        self._times = deque(maxlen=max(self.window_size, 1))
        self._outcomes = deque(maxlen=self.outcome_window)
        self._costs = deque(maxlen=COST_WINDOW)
        self._arrivals = ArrivalMemory()
        self._owner_tenants: dict = {}  # owner -> its last reported tenant counters (budget leases)
        self._quotes = 0
        self.last_quote = None
        self._tenant_of = OrderedDict()  # rid -> tenant, until it settles
        self._open_seen: deque = deque(maxlen=max(self.window_size, 1))  # open reservations at recent arrivals
        self._lease_in_flight: dict[str, int] = {}  # owner -> open reservations inside its lease (its last report)
        self._last_share: float | None = None  # the last clearing's reservation share theta (a search hint)
        if not (isinstance(self.block_reserve, (int, float)) and 0 <= self.block_reserve <= 1):
            raise InvalidInputError("block_reserve", self.block_reserve, "must be in [0, 1]")
        for t, w in self.tenant_weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise InvalidInputError(f"tenant_weights[{t}]", w, "must be finite and > 0")
        if not self.market.weights_tenants and any(w != 1.0 for w in self.tenant_weights.values()):
            raise InvalidInputError("tenant_weights", self.tenant_weights,
                                    f"{self.policy.name} does not weight queries (use clear-cost)")
        self.tenants: dict[str, TenantStats] = {t: TenantStats(float(w)) for t, w in self.tenant_weights.items()}

    def tenant_weight(self, tenant: str) -> float:
        return float(self.tenant_weights.get(tenant, 1.0))

    def _stats(self, tenant: str) -> TenantStats:
        if tenant not in self.tenants:
            if len(self.tenants) >= MAX_TENANTS:  # bounded: a client cannot grow the books with new names
                tenant = OTHER_TENANT
            self.tenants.setdefault(tenant, TenantStats(self.tenant_weight(tenant)))
        return self.tenants[tenant]

    def tenant_snapshot(self) -> dict:
        return {t: s.as_dict() for t, s in self.tenants.items()}

    @property
    def budget(self) -> Budget:
        return self.ledger.budget

    def budget_per_query(self, now: float, ahead: bool = False) -> float:
        """b of the window market (the budget's :meth:`~clear_core.budget.Budget.pricing_budget_per_query`).

        ``ahead``: for the next arrival, not yet counted (a quote prices requests still to come; the
        budget block that arrival would open is counted in).
        """
        n = len(self._times)
        span = max(now - self._times[0], self.min_rate_span_s) if n else self.min_rate_span_s
        arrivals = self.ledger.arrivals + int(ahead)
        opens = self.budget.grant_on_arrival(arrivals) if ahead else 0.0
        return self.budget.pricing_budget_per_query(
            available=self.ledger.pricing_available(now) + opens, arrivals=arrivals,
            recent_arrivals=n, recent_span_s=span, pace=self.pace, cap_cost_ratio=self.cap_cost_ratio(),
        )

    def concurrency(self) -> int:
        """Requests in flight the float is sized for: the most open reservations seen at a recent arrival
        (the allocator's own and those the ingress replicas last reported inside their leases)."""
        return max([self.in_flight(), *self._open_seen])

    def in_flight(self) -> int:
        """Open reservations now: the ledger's and the leases' (as last reported)."""
        return self.ledger.in_flight + sum(self._lease_in_flight.values())

    def absorb_in_flight(self, owner: str, open_reservations: int) -> None:
        """An ingress replica's open reservations inside its lease (its report), for :meth:`concurrency`."""
        n = int(open_reservations)
        if n < 0:
            raise InvalidInputError("in_flight", open_reservations, "must be >= 0")
        self._lease_in_flight[str(owner)] = n

    def mean_cap_budget(self, now: float) -> float | None:
        """What each admitted cap may hold on average: ``unspent / (K + 1)`` with ``K`` requests in flight
        (:meth:`concurrency`); None when the policy does not price reservations or nothing is in flight."""
        k = self.concurrency()
        if not self.policy.prices_reservations or k == 0:
            return None
        return float(max(self.ledger.unspent(now), 0) / (k + 1))

    def block_bound(self, b: float, now: float) -> float | None:
        """The most one cap may hold near the end of a per-query block: the pool less ``block_reserve``
        times the paced budget ``b`` for each later arrival of the block; None where it does not apply
        (module docstring, "The end of a block")."""
        budget = self.budget
        if not (self.block_reserve > 0 and self.pace and isinstance(budget, PerQueryBudget)):
            return None
        later = budget.remaining_in_block(self.ledger.arrivals) - 1
        return float(self.ledger.available(now) - self.block_reserve * later * b)

    def cap_cost_ratio(self) -> float:
        """Tokens of cap per token actually charged, over recent settlements (refunds to the pool).

        The window market clears *caps*, but when unused caps are refunded to
        the pool a request only costs what it generates. Pricing caps against
        the budget alone would abandon requests while the pool fills up;
        scaling the per-query budget by the observed cap / charge ratio prices
        what a request really costs. 1 until ``MIN_COST_SAMPLES`` requests have
        settled, and never above ``MAX_CAP_COST_RATIO``; the ledger still
        reserves whole caps, so the invariant is untouched.
        """
        if self.market.charges_generated_tokens:  # its budget already is one of expected generated tokens
            return 1.0
        if not self.budget.refund_unused or len(self._costs) < MIN_COST_SAMPLES:
            return 1.0
        caps = sum(c for c, _ in self._costs)
        charged = sum(g for _, g in self._costs)
        return float(min(max(caps / max(charged, 1), 1.0), MAX_CAP_COST_RATIO))

    def settle(self, rid: str, generated: int, *, failed: bool = False) -> Settlement:
        """End a request in the ledger and remember what its cap really cost."""
        s = self.ledger.settle(rid, generated, failed=failed)
        if not failed:
            self._costs.append((s.cap, s.charged))
        tenant = self._tenant_of.pop(rid, None)
        if tenant is not None:
            self._stats(tenant).generated_tokens += int(s.charged)
        return s

    def arrival_rate(self, now: float) -> float:
        """Recent arrivals per second (over the window's arrival times)."""
        n = len(self._times)
        if n == 0:
            return 0.0
        return n / max(now - self._times[0], self.min_rate_span_s)

    def abandonment_rate(self) -> float:
        return float(np.mean(self._outcomes)) if self._outcomes else 0.0

    def window(self) -> np.ndarray:
        """The recent thresholds the price is cleared against."""
        return self._window.rows()[:, 0]

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
    ) -> Decision:
        """Price one arriving request, reserve its cap or abandon it.

        ``log_sigma`` and ``runaway`` describe the request's length
        distribution (module docstring), ``tenant`` whose request it is (its
        weight and counters). ``client_cap_tokens`` is the most the client
        accepts (its ``max_tokens`` within the context); the reserved cap never
        exceeds it. ``owner`` is whoever will settle the reservation (its
        lease, see the ledger); ``arrival_key`` and ``retry`` recognise a
        retried request (module docstring). ``length_bin`` indexes ``lengths``
        (``clear-cost-emp`` only; ``threshold_tokens`` is then the raw prediction
        the histogram is relative to).
        """
        now = self.ledger.now() if now is None else now
        check_request(threshold_tokens, log_sigma, runaway, client_cap_tokens)
        if self.market.prices_length_histograms:
            length_bin = int(checked_length_bins([length_bin], len(self.lengths))[0])
        new = self._arrivals.is_new(arrival_key, retry, now)
        if new:
            self.ledger.arrive()
            self._times.append(now)
            self._open_seen.append(self.in_flight())
        b = self.budget_per_query(now)
        entry = self.market.demand_row(threshold_tokens, log_sigma, runaway, self.tenant_weight(tenant), length_bin)
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
        if bound is not None and market_cap > bound:  # the end of a block (module docstring)
            market_cap = self.market.cap_within(alloc, entry, bound, context_limit_tokens=self.context_limit_tokens,
                                                lengths=self.lengths)
        cap = market_cap if client_cap_tokens is None else min(market_cap, int(client_cap_tokens))
        quote = dict(
            market_cap_tokens=market_cap, shadow_price=price, reservation_price=self.last_reservation_price,
            threshold_tokens=float(threshold_tokens),
            budget_per_query_tokens=b, window_size=int(tau.size), new_arrival=new, tenant=tenant,
        )
        if market_cap <= 0:
            return self._abandon(DecisionReason.INSOLVENT, now, threshold_tokens, quote)
        avail = self.ledger.available(now)
        reason = DecisionReason.ADMITTED
        if cap > avail:
            # A cut cap must still reach the predicted threshold (the median of
            # the true length under the predictor's error) to be worth serving.
            need = math.ceil(threshold_tokens)
            if avail >= max(need, 1):
                cap, reason = avail, DecisionReason.CUT_TO_AVAILABLE
            else:
                return self._abandon(DecisionReason.POOL_EMPTY, now, need, quote)
        self.ledger.reserve(rid, cap, now, owner=owner)
        stats = self._stats(tenant)
        stats.allocated_tokens += int(cap)
        self._tenant_of[rid] = tenant
        while len(self._tenant_of) > TENANT_MEMORY:
            self._tenant_of.popitem(last=False)
        if new:
            self._outcomes.append(False)
            stats.admitted += 1
        return Decision(reason=reason, cap_tokens=cap, **quote)

    def snapshot(self) -> dict:
        """Pricing memory (recent thresholds and outcomes) for an allocator restart."""
        return {"window": [list(w) for w in self._window], "outcomes": [bool(x) for x in self._outcomes],
                "last_price": self.last_price, "tenants": {t: s.as_dict() for t, s in self.tenants.items()},
                "owner_tenants": {o: {t: dict(v) for t, v in d.items()} for o, d in self._owner_tenants.items()}}

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
        for t, d in snap.get("tenants", {}).items():
            st = self._stats(t)
            st.admitted, st.abandoned = int(d.get("admitted", 0)), int(d.get("abandoned", 0))
            st.allocated_tokens, st.generated_tokens = int(d.get("allocated_tokens", 0)), int(d.get("generated_tokens", 0))
        self._outcomes.extend(bool(x) for x in snap.get("outcomes", []))
        self._owner_tenants = {o: {t: dict(v) for t, v in d.items()} for o, d in snap.get("owner_tenants", {}).items()}
        self.last_price = float(snap.get("last_price", 0.0))

    def _abandon(self, reason: DecisionReason, now: float, need: float, quote: dict) -> Decision:
        if quote["new_arrival"]:
            self._outcomes.append(True)
            self._stats(quote["tenant"]).abandoned += 1
        # Insolvent: the price moves only as the demand it is cleared against turns over. Pool empty:
        # the refill time (inf: no refill will cover it, per-query blocks).
        refill = self.ledger.seconds_until(need, now) if reason is DecisionReason.POOL_EMPTY else math.inf
        retry, should_retry = retry_advice(reason, self.turnover_s(now), refill)
        return Decision(reason=reason, cap_tokens=0, retry_after_s=retry, should_retry=should_retry, **quote)

    def turnover_s(self, now: float) -> float:
        """About how long until the demand the price is cleared against has turned over, s."""
        rate = self.arrival_rate(now)
        return len(self._window) / rate if rate > 0 else math.inf

    # -- decisions at the ingress (budget leases, clear_core.lease) ---------------------

    def absorb(self, rows, now: float | None = None) -> None:
        """New arrivals priced elsewhere (an ingress replica's report): each row is
        ``(threshold, spread, runaway share, weight)``, and its length bin for a
        policy that prices histograms. They credit the budget (per-query
        blocks), enter the pricing window and the arrival rate."""
        now = self.ledger.now() if now is None else now
        for row in rows:
            if len(row) < self._width:  # extra values (another policy's replica) are ignored
                raise InvalidInputError("report row", len(row), f"{self.policy.name} needs {self._width} values")
            tau, sig, rho, w = (float(v) for v in row[:4])
            check_request(tau, sig, rho, None)
            if not (math.isfinite(w) and w > 0):
                raise InvalidInputError("weight", w, "must be finite and > 0")
            bin_ = None
            if self.market.prices_length_histograms:
                bin_ = int(checked_length_bins([row[4]], len(self.lengths))[0])
            entry = self.market.demand_row(tau, sig, rho, w, bin_)
            self.ledger.arrive()
            self._times.append(now)
            self._open_seen.append(self.in_flight())
            if self.window_size > 0:
                self._window.append(entry)

    def absorb_tenants(self, owner: str, counters: dict) -> None:
        """An owner's cumulative per-tenant counters; the change since its last report is added
        (its new admissions and abandonments enter the abandonment rate)."""
        last = self._owner_tenants.setdefault(owner, {})
        for tenant, values in list(counters.items())[:MAX_TENANTS]:
            new = {k: int(values.get(k, 0)) for k in ("admitted", "abandoned", "allocated_tokens", "generated_tokens")}
            old = last.get(tenant, {})
            st = self._stats(str(tenant))
            delta = {k: max(v - old.get(k, 0), 0) for k, v in new.items()}
            for k, v in delta.items():
                setattr(st, k, getattr(st, k) + v)
            self._outcomes.extend([False] * min(delta["admitted"], self.outcome_window))
            self._outcomes.extend([True] * min(delta["abandoned"], self.outcome_window))
            last[tenant] = new

    def reporting_owners(self) -> list[str]:
        return list(self._owner_tenants)

    def forget_owner(self, owner: str) -> None:
        self._owner_tenants.pop(owner, None)
        self._lease_in_flight.pop(owner, None)

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
