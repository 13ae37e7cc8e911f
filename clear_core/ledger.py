"""The global token budget: a pure ledger and the online market that prices a stream.

Two objects, both plain synchronous state with no concurrency of their own (the
pattern of Text Generation Inference's queue: a thin actor owns the state and
serialises the commands; the state itself is unit-tested without any actor):

:class:`TokenLedger`
    Books of the budget. ``granted`` tokens have been credited to the pool so
    far; ``reserved`` are held by in-flight requests (their caps); ``spent``
    are charged for requests that ended. The **budget invariant**

        reserved + spent <= granted

    holds after every command: :meth:`TokenLedger.reserve` refuses (raises
    :class:`~clear_core.errors.BudgetExhaustedError`) whatever would break it.
    A request that ends (:meth:`TokenLedger.settle`) releases its reservation
    and is charged what it generated; the unused part of its cap is *refunded*.

:class:`OnlineMarket`
    Turns one arriving request (a predicted threshold) into a cap, a shadow
    price, or an abandonment, then reserves the cap in the ledger.

Budget modes
------------
``per_query`` (the paper's setting: ``b`` tokens per query on average)
    The *budget window* is a block of ``window_queries`` arrivals: when the
    first request of a block arrives, the pool is credited
    ``window_queries * b`` tokens, so after ``n`` arrivals
    ``granted = ceil(n / window_queries) * window_queries * b``. Every arrival
    (admitted or abandoned; requests rejected as malformed never reach the
    market) counts. Like the offline bench, the budget counts *caps*: with
    ``refund_unused=False`` (the default of this mode) a request is charged its
    whole cap, the unused part is reported as refunded to the client's account
    but does not return to the pool, and the total allocated over a stream of
    ``N`` requests (``N`` a multiple of the window) never exceeds ``N * b``:
    exactly the offline bench's constraint. With ``refund_unused=True`` the
    pool gets the unused part back (what a GPU operator pays for is generated
    tokens), so the same budget admits more.
``rate`` (a token bucket)
    The bucket starts full with ``burst_tokens`` and refills at
    ``tokens_per_s``; its content is the available budget *plus* the tokens
    reserved by in-flight requests, and never exceeds ``burst_tokens``
    (``available + reserved <= burst``: the burst is the most budget that can be
    committed at once). Unused tokens go back to the bucket when a request ends
    (``refund_unused=True`` by default); only generated tokens leave it.

Online pricing (why a rolling window)
-------------------------------------
Requests arrive one by one, so a market with only the requests currently in
flight is *thin*: a lone request would always clear at price 0 and get its
peak. :class:`OnlineMarket` keeps the last ``window_size`` predicted
thresholds it has seen (admitted or not) and clears the market of
``window + [new request]`` with budget ``b * (len(window) + 1)`` (the paper's
batch problem, Eq. 14, on a sample of recent demand); the new request gets its
cap from that clearing and the market's shadow price is the price quoted. When
traffic is stationary the window is a sample of the same distribution as the
batch, so the clearing price and every cap converge to those of the offline
batch (the per-query budget and the threshold distribution are what fix the
price). In ``rate`` mode the per-query budget of the window market is what the
refill rate buys at the recent arrival rate, ``b = tokens_per_s * span / n``
over the window's arrivals (``span`` floored at ``min_rate_span_s``).

The ledger then checks solvency against the real pool: if the cap does not fit
the available budget, it is cut to what is available when that still reaches
the request's predicted threshold, and the request is abandoned otherwise.

Reservations that are never settled (an ingress replica died) expire after
``reservation_ttl_s`` and are charged in full, so a reservation can never leak
for ever; a late settle of an expired reservation is ignored.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from clear_core.errors import BudgetExhaustedError, InvalidInputError, UnknownReservationError
from clear_core.policies import Policy

BUDGET_MODES = ("per_query", "rate")
#: Abandoned requests are retried after at least this long (HTTP Retry-After).
MIN_RETRY_AFTER_S = 1.0
#: Floor of the arrival span used to estimate the arrival rate in rate mode.
DEFAULT_MIN_RATE_SPAN_S = 1.0
#: Recent decisions over which the abandonment rate is reported.
DEFAULT_OUTCOME_WINDOW = 200
#: Rate mode with refunds: settlements over which the cap / charge ratio is measured,
#: how many are needed before it is used, and its ceiling.
COST_WINDOW = 256
MIN_COST_SAMPLES = 20
MAX_CAP_COST_RATIO = 8.0


@dataclass(frozen=True)
class BudgetSpec:
    """What the budget is: ``per_query`` (paper) or ``rate`` (token bucket)."""

    mode: str = "per_query"
    tokens_per_query: float = 512.0  # per_query: average budget b per query, tokens
    window_queries: int = 500  # per_query: arrivals per budget block (the budget window)
    tokens_per_s: float = 0.0  # rate: refill rate of the bucket, tokens per second
    burst_tokens: float = 0.0  # rate: bucket capacity (and initial pool), tokens
    refund_unused: bool | None = None  # None: False for per_query, True for rate
    reservation_ttl_s: float = 600.0  # unsettled reservations expire (charged in full) after this

    def __post_init__(self):
        if self.mode not in BUDGET_MODES:
            raise InvalidInputError("budget mode", self.mode, f"expected one of {BUDGET_MODES}")
        if self.mode == "per_query":
            if not (math.isfinite(self.tokens_per_query) and self.tokens_per_query >= 0):
                raise InvalidInputError("tokens_per_query", self.tokens_per_query, "must be finite and >= 0")
            if not (isinstance(self.window_queries, int) and self.window_queries >= 1):
                raise InvalidInputError("window_queries", self.window_queries, "must be an integer >= 1")
        else:
            if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s >= 0):
                raise InvalidInputError("tokens_per_s", self.tokens_per_s, "must be finite and >= 0")
            if not (math.isfinite(self.burst_tokens) and self.burst_tokens >= 0):
                raise InvalidInputError("burst_tokens", self.burst_tokens, "must be finite and >= 0")
        if not (self.reservation_ttl_s > 0):
            raise InvalidInputError("reservation_ttl_s", self.reservation_ttl_s, "must be > 0")

    @property
    def refunds_to_pool(self) -> bool:
        if self.refund_unused is None:
            return self.mode == "rate"
        return bool(self.refund_unused)


@dataclass(frozen=True)
class LedgerState:
    """A consistent snapshot of the books, all in tokens."""

    granted: float  # budget credited to the pool so far
    reserved: int  # caps held by in-flight requests
    spent: int  # charged for requests that ended
    available: int  # floor(granted - reserved - spent): what a new cap may take
    in_flight: int  # open reservations
    allocated_total: int  # sum of every cap ever reserved
    generated_total: int  # tokens the engines reported generating
    refunded_total: int  # unused parts of caps (cap - generated) of ended requests
    expired_total: int  # reservations that timed out and were charged in full
    arrivals: int  # requests that reached the market

    @property
    def invariant_holds(self) -> bool:
        return self.reserved + self.spent <= self.granted + 1e-6


@dataclass(frozen=True)
class Settlement:
    cap: int  # tokens the request had reserved
    generated: int  # tokens it generated (clipped to the cap)
    refunded: int  # cap - generated
    charged: int  # what the pool was charged (generated, or the cap without refunds)


@dataclass
class _Reservation:
    cap: int
    created: float


class TokenLedger:
    """The budget's books; every method keeps ``reserved + spent <= granted``."""

    def __init__(self, spec: BudgetSpec, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self._clock = clock
        self._reservations: OrderedDict[str, _Reservation] = OrderedDict()
        self._reserved = 0
        self._spent = 0
        self._arrivals = 0
        self._allocated = 0
        self._generated = 0
        self._refunded = 0
        self._expired = 0
        self._last_refill = clock()
        # The bucket starts full; per-query blocks are credited on arrival.
        self._granted = float(spec.burst_tokens) if spec.mode == "rate" else 0.0

    # -- budget inflow -------------------------------------------------------

    def _refill(self, now: float) -> None:
        if self.spec.mode != "rate":
            return
        dt = max(0.0, now - self._last_refill)
        self._last_refill = max(self._last_refill, now)
        # The bucket holds what is available *and* what is lent out to in-flight
        # requests (their reservations come back, in part, as refunds), so it
        # never holds more than its capacity: available + reserved <= burst.
        level = self._granted - self._spent
        room = self.spec.burst_tokens - level
        if room > 0:
            self._granted += min(self.spec.tokens_per_s * dt, room)

    def arrive(self) -> None:
        """Count one arriving request (credits a new block in per-query mode)."""
        self._arrivals += 1
        if self.spec.mode == "per_query":
            w = self.spec.window_queries
            if (self._arrivals - 1) % w == 0:
                self._granted += w * self.spec.tokens_per_query

    def remaining_in_block(self) -> int:
        """Arrivals still to come in the current per-query block, the latest one included."""
        w = self.spec.window_queries
        return w - (self._arrivals - 1) % w if self._arrivals else w

    # -- commands ------------------------------------------------------------

    def available(self, now: float | None = None) -> int:
        self._refill(self._clock() if now is None else now)
        return int(math.floor(self._granted - self._reserved - self._spent + 1e-9))

    def reserve(self, rid: str, cap: int, now: float | None = None) -> None:
        """Hold ``cap`` tokens for request ``rid``; raise if they are not available."""
        now = self._clock() if now is None else now
        if not isinstance(cap, (int, np.integer)) or cap < 0:
            raise InvalidInputError("cap", cap, "must be an integer >= 0")
        if rid in self._reservations:
            raise InvalidInputError("reservation id", rid, "already holds a reservation")
        cap = int(cap)
        avail = self.available(now)
        if cap > avail:
            raise BudgetExhaustedError(f"cap {cap} exceeds the available budget {avail}")
        self._reservations[rid] = _Reservation(cap=cap, created=now)
        self._reserved += cap
        self._allocated += cap

    def settle(self, rid: str, generated: int) -> Settlement:
        """End request ``rid`` having generated ``generated`` tokens; refund the rest."""
        res = self._reservations.pop(rid, None)
        if res is None:
            raise UnknownReservationError(f"no open reservation {rid!r} (settled twice or expired)")
        if not isinstance(generated, (int, np.integer)) or generated < 0:
            self._reservations[rid] = res  # leave the books as they were
            raise InvalidInputError("generated", generated, "must be an integer >= 0")
        used = min(int(generated), res.cap)
        refunded = res.cap - used
        charged = used if self.spec.refunds_to_pool else res.cap
        self._refill(self._clock())  # bucket level before the refund returns
        self._reserved -= res.cap
        self._spent += charged
        self._generated += used
        self._refunded += refunded
        return Settlement(cap=res.cap, generated=used, refunded=refunded, charged=charged)

    def expire(self, now: float | None = None) -> list[str]:
        """Charge in full and drop reservations older than the TTL; return their ids."""
        now = self._clock() if now is None else now
        gone = []
        ttl = self.spec.reservation_ttl_s
        while self._reservations:
            rid, res = next(iter(self._reservations.items()))
            if now - res.created < ttl:
                break  # ordered by creation time
            self._reservations.popitem(last=False)
            self._reserved -= res.cap
            self._spent += res.cap
            self._expired += 1
            gone.append(rid)
        return gone

    def holds(self, rid: str) -> bool:
        return rid in self._reservations

    def state(self, now: float | None = None) -> LedgerState:
        avail = self.available(now)
        return LedgerState(
            granted=self._granted,
            reserved=self._reserved,
            spent=self._spent,
            available=avail,
            in_flight=len(self._reservations),
            allocated_total=self._allocated,
            generated_total=self._generated,
            refunded_total=self._refunded,
            expired_total=self._expired,
            arrivals=self._arrivals,
        )

    # -- durability ----------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict:
        """The books as plain JSON-able values, for surviving an allocator restart.

        Times are stored as ages (the clock is per process); see :meth:`restore`.
        """
        now = self._clock() if now is None else now
        self._refill(now)  # the bucket level as of this instant
        return {
            "spec": asdict(self.spec),
            "granted": self._granted,
            "spent": self._spent,
            "arrivals": self._arrivals,
            "allocated": self._allocated,
            "generated": self._generated,
            "refunded": self._refunded,
            "expired": self._expired,
            "reservations": [[rid, r.cap, max(0.0, now - r.created)] for rid, r in self._reservations.items()],
        }

    @classmethod
    def restore(cls, snap: dict, clock: Callable[[], float] = time.monotonic) -> TokenLedger:
        """Rebuild the books from :meth:`snapshot`, conservatively.

        Open reservations stay reserved (their requests may still settle, or
        expire after the TTL); the time the allocator was down counts neither
        as reservation age nor as bucket refill, so a restart can only make the
        budget tighter, never looser.
        """
        spec = BudgetSpec(**snap["spec"])
        led = cls(spec, clock)
        now = clock()
        led._granted = float(snap["granted"])
        led._spent = int(snap["spent"])
        led._arrivals = int(snap["arrivals"])
        led._allocated = int(snap["allocated"])
        led._generated = int(snap["generated"])
        led._refunded = int(snap["refunded"])
        led._expired = int(snap["expired"])
        for rid, cap, age in snap["reservations"]:
            led._reservations[str(rid)] = _Reservation(cap=int(cap), created=now - float(age))
            led._reserved += int(cap)
        led._last_refill = now
        if not led.state(now).invariant_holds:
            raise InvalidInputError("ledger snapshot", "reserved + spent > granted", "refusing to restore broken books")
        return led

    def seconds_until(self, tokens: float, now: float | None = None) -> float:
        """How long until ``tokens`` could be available (inf if never by refill alone)."""
        avail = self.available(now)
        if avail >= tokens:
            return 0.0
        if self.spec.mode == "rate" and self.spec.tokens_per_s > 0 and tokens <= self.spec.burst_tokens:
            return (tokens - avail) / self.spec.tokens_per_s
        return math.inf


# --------------------------------------------------------------------------
# The online market
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the market decided for one request."""

    admitted: bool
    cap: int  # reserved completion cap in tokens (0 when abandoned)
    market_cap: int  # the window market's cap before the client limit and the ledger check
    shadow_price: float  # clearing price of the window market (utility per token)
    threshold: float  # predicted threshold tau_hat, tokens
    budget_per_query: float  # per-query budget the window market was cleared with, tokens
    reason: str  # "admitted", "cut_to_available", "market" (insolvent) or "budget" (pool too low)
    retry_after_s: float = 0.0  # abandoned: when a retry may succeed
    window_size: int = 0  # thresholds the price was cleared against (window + this one)


@dataclass
class OnlineMarket:
    """Clears each arriving request against a rolling window of recent demand (module docstring)."""

    policy: Policy
    ledger: TokenLedger
    window_size: int = 256  # recent thresholds the price is cleared against
    max_tokens: int | None = None  # context limit t_max for every cap
    min_rate_span_s: float = DEFAULT_MIN_RATE_SPAN_S
    pace: bool = True  # per_query: clear with the block's remaining budget per remaining arrival
    outcome_window: int = DEFAULT_OUTCOME_WINDOW
    _window: deque = field(init=False, repr=False)
    _times: deque = field(init=False, repr=False)
    _outcomes: deque = field(init=False, repr=False)
    _costs: deque = field(init=False, repr=False)
    last_price: float = field(init=False, default=0.0)

    def __post_init__(self):
        if not (isinstance(self.window_size, int) and self.window_size >= 0):
            raise InvalidInputError("window_size", self.window_size, "must be an integer >= 0")
        self._window = deque(maxlen=self.window_size or None)
        self._times = deque(maxlen=max(self.window_size, 1))
        self._outcomes = deque(maxlen=self.outcome_window)
        self._costs = deque(maxlen=COST_WINDOW)
        if self.window_size == 0:
            self._window = deque(maxlen=0)

    @property
    def spec(self) -> BudgetSpec:
        return self.ledger.spec

    def budget_per_query(self, now: float) -> float:
        """b of the window market: configured, or what the refill rate buys per arrival."""
        if self.spec.mode == "per_query":
            if not self.pace:
                return float(self.spec.tokens_per_query)
            # Pacing: what is left of the block per arrival still to come in it
            # (this one included), so over- or under-spending early in a block
            # is corrected smoothly instead of starving the block's last requests.
            remaining = self.ledger.remaining_in_block()
            return max(self.ledger.available(now), 0) / remaining
        n = len(self._times)
        span = max(now - self._times[0], self.min_rate_span_s) if n else self.min_rate_span_s
        return self.spec.tokens_per_s * span / max(n, 1) * self.cap_cost_ratio()

    def cap_cost_ratio(self) -> float:
        """Tokens of cap per token actually charged, over recent settlements (rate mode).

        The window market clears *caps*, but when unused caps are refunded to
        the pool a request only costs what it generates. Pricing caps against
        the refill rate alone would abandon requests while the bucket fills up;
        scaling the per-query budget by the observed cap / charge ratio prices
        what a request really costs. 1 until ``MIN_COST_SAMPLES`` requests have
        settled, and never above ``MAX_CAP_COST_RATIO``; the ledger still
        reserves whole caps, so the invariant is untouched.
        """
        if not self.spec.refunds_to_pool or len(self._costs) < MIN_COST_SAMPLES:
            return 1.0
        caps = sum(c for c, _ in self._costs)
        charged = sum(g for _, g in self._costs)
        return float(min(max(caps / max(charged, 1), 1.0), MAX_CAP_COST_RATIO))

    def settle(self, rid: str, generated: int) -> Settlement:
        """End a request in the ledger and remember what its cap really cost."""
        s = self.ledger.settle(rid, generated)
        self._costs.append((s.cap, s.charged))
        return s

    def abandonment_rate(self) -> float:
        return float(np.mean(self._outcomes)) if self._outcomes else 0.0

    def window(self) -> np.ndarray:
        return np.asarray(self._window, dtype=float)

    def request(
        self,
        rid: str,
        threshold: float,
        *,
        log_sigma: float = 0.0,
        max_tokens: int | None = None,
        now: float | None = None,
    ) -> Decision:
        """Price one arriving request, reserve its cap or abandon it."""
        now = self.ledger._clock() if now is None else now
        if not (math.isfinite(threshold) and threshold >= 0):
            raise InvalidInputError("threshold", threshold, "must be finite and >= 0")
        if max_tokens is not None and max_tokens < 1:
            raise InvalidInputError("max_tokens", max_tokens, "must be >= 1")
        self.ledger.arrive()
        self._times.append(now)
        b = self.budget_per_query(now)
        tau = np.append(self.window(), threshold)
        alloc = self.policy.allocate(tau, b * tau.size, max_tokens=self.max_tokens, log_sigma=log_sigma)
        if self.window_size > 0:
            self._window.append(float(threshold))
        price = float(alloc.shadow_price) if math.isfinite(alloc.shadow_price) else 0.0
        self.last_price = price
        market_cap = int(alloc.caps[-1])
        cap = market_cap if max_tokens is None else min(market_cap, int(max_tokens))
        common = dict(
            market_cap=market_cap, shadow_price=price, threshold=float(threshold),
            budget_per_query=b, window_size=int(tau.size),
        )
        if market_cap <= 0:
            return self._abandon("market", now, threshold, common)
        avail = self.ledger.available(now)
        reason = "admitted"
        if cap > avail:
            # A cut cap must still reach the predicted threshold (the median of
            # the true length under the predictor's error) to be worth serving.
            need = math.ceil(threshold)
            if avail >= max(need, 1):
                cap, reason = avail, "cut_to_available"
            else:
                return self._abandon("budget", now, need, common)
        self.ledger.reserve(rid, cap, now)
        self._outcomes.append(False)
        return Decision(admitted=True, cap=cap, reason=reason, **common)

    def snapshot(self) -> dict:
        """Pricing memory (recent thresholds and outcomes) for an allocator restart."""
        return {"window": list(self._window), "outcomes": [bool(x) for x in self._outcomes],
                "last_price": self.last_price}

    def seed(self, thresholds) -> None:
        """Prime the pricing window with thresholds of representative past demand.

        At a cold start the window is empty and the first requests would be
        priced against themselves alone; a seed (e.g. the predictions of a
        recent traffic sample) prices them against realistic demand from the
        first request on. Arrivals then push the seed out of the window.
        """
        values = [float(x) for x in thresholds]
        if any(not (math.isfinite(v) and v >= 0) for v in values):
            raise InvalidInputError("pricing window seed", values[:5], "thresholds must be finite and >= 0")
        self._window.extend(values)

    def restore(self, snap: dict) -> None:
        self._window.extend(float(x) for x in snap.get("window", []))
        self._outcomes.extend(bool(x) for x in snap.get("outcomes", []))
        self.last_price = float(snap.get("last_price", 0.0))

    def _abandon(self, reason: str, now: float, need: float, common: dict) -> Decision:
        self._outcomes.append(True)
        wait = self.ledger.seconds_until(need, now)
        retry = MIN_RETRY_AFTER_S if not math.isfinite(wait) else max(MIN_RETRY_AFTER_S, wait)
        return Decision(admitted=False, cap=0, reason=reason, retry_after_s=float(retry), **common)
