"""Decisions at the ingress: a budget lease and a price quote instead of a call per request.

In the central mode every request asks the one allocator for its cap
(:class:`clear_core.online_market.OnlineMarket`). Here an ingress replica
decides locally, with two things the allocator gives it:

* a **price quote** (:class:`clear_core.quotes.PriceQuote`): the shadow price
  of the recent demand, from which each request's cap is its own best
  response, ``O(1)``;
* a **budget lease**: a block of the global pool lent to the replica
  (:meth:`clear_core.ledger.TokenLedger.grant_lease`). The replica reserves
  caps against it, settles them locally (refunds stay in the lease) and never
  reserves more than it holds: ``reserved <= lease``.

:class:`LeaseBook` is the replica's side of the lease, :class:`IngressMarket`
its decisions. Every so often (and at once when a cap does not fit the lease)
the replica sends a :class:`LeaseReport`: cumulative counters (charged, given
back, the token totals, per-tenant counters) and the new arrivals since the
last acknowledged one, numbered, so a report may be repeated or lost without
counting twice. The allocator reconciles it, moves the price (a clearing of the
recent window, off the request path) and answers a :class:`LeaseReply`: the
new quote, the lease's new size, and which arrivals it has. Globally
``reserved + leased + spent <= granted`` (the ledger's invariant), so the
budget cannot be overspent however stale a quote is: staleness costs accuracy
(caps priced at an old price), never budget.

A replica that dies loses at most its lease: the allocator takes it back when
the replica's liveness lease lapses and revokes it (what it had charged and
not reported is the only loss, and that is within the lease). A replica whose
lease was revoked (it was cut off for longer than the lease TTL) opens a new
one under a new owner name; its open caps are no longer the allocator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clear_core.decision import Decision, DecisionReason, abandonment, fit_to_pool, probe_cap, usable_cap
from clear_core.demand import ArrivalMemory, request_row
from clear_core.errors import BudgetExhaustedError, InvalidInputError
from clear_core.exploration import Exploration, ExplorationBooks
from clear_core.ledger import Settlement
from clear_core.policies import Policy
from clear_core.servable import SERVABLE_POLICIES, ServableMarket
from clear_core.tenants import DEFAULT_TENANT, TenantBooks, TenantStats
from clear_core.quotes import PriceQuote, caps_at_quote

#: Arrivals kept for the next report while the allocator is unreachable (the oldest go first).
MAX_PENDING_ARRIVALS = 8192


@dataclass
class LeaseReport:
    """What a replica tells the allocator (cumulative counters and numbered arrivals, so idempotent)."""

    owner: str
    counters: dict  # clear_core.ledger.LEASE_COUNTERS, cumulative since the lease opened
    reserved: int  # caps open inside the lease now
    first_seq: int  # number of the first arrival in ``arrivals``
    arrivals: list  # (threshold, spread, runaway share, weight) per new arrival, numbered from first_seq
    tenants: dict  # tenant -> cumulative TenantStats counters of this replica
    want_tokens: int = 0  # more lease wanted now
    in_flight: int = 0  # requests open inside the lease now (the allocator prices the caps they hold)


@dataclass(frozen=True)
class LeaseReply:
    """What the allocator answers a report."""

    quote: PriceQuote
    granted_total: int  # tokens lent to this owner so far (the ledger is the authority)
    next_seq: int  # arrivals up to here are absorbed
    revoked: bool = False  # the lease lapsed: open a new one under a new owner name
    refill_s: float = math.inf  # a shortfall of the reported want refills in about this long
    lease_target_tokens: int | None = None  # hold about this much available (the pool's share per owner)


class LeaseBook:
    """The replica's side of its budget lease: ``reserved <= granted - charged - returned``."""

    def __init__(self, refund_unused: bool):
        self.refund_unused = bool(refund_unused)
        self.granted = 0  # tokens lent so far (the allocator's figure)
        self.charged = 0
        self.returned = 0
        self.reserved = 0
        self.allocated = 0
        self.generated = 0
        self.refunded = 0
        self.failed = 0
        self._caps: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Tokens of the lease not charged nor given back (reserved ones included)."""
        return self.granted - self.charged - self.returned

    @property
    def available(self) -> int:
        return self.held - self.reserved

    def counters(self) -> dict:
        return {"charged": self.charged, "returned": self.returned, "allocated": self.allocated,
                "generated": self.generated, "refunded": self.refunded, "failed": self.failed}

    def set_granted(self, total: int) -> None:
        """The allocator's figure of what it lent (a lost reply is made good by the next one)."""
        self.granted = max(self.granted, int(total))

    def give_back(self, tokens: int) -> int:
        """Return up to ``tokens`` unreserved tokens to the pool (reported with the next report)."""
        n = max(min(int(tokens), self.available), 0)
        self.returned += n
        return n

    def reserve(self, rid: str, cap: int) -> None:
        if not isinstance(cap, int) or cap < 0:
            raise InvalidInputError("cap", cap, "must be an integer >= 0")
        if rid in self._caps:
            raise InvalidInputError("reservation id", rid, "already holds a reservation")
        if cap > self.available:
            raise BudgetExhaustedError(f"cap {cap} exceeds the lease's available {self.available}")
        self._caps[rid] = cap
        self.reserved += cap
        self.allocated += cap

    def settle(self, rid: str, generated: int, *, failed: bool = False) -> Settlement | None:
        """End ``rid``; ``None`` if it holds no reservation (idempotent, like the ledger's)."""
        cap = self._caps.pop(rid, None)
        if cap is None:
            return None
        s = Settlement.of(cap, generated, refund_unused=self.refund_unused, failed=failed)
        self.reserved -= cap
        self.charged += s.charged
        self.generated += s.generated
        self.refunded += s.refunded
        self.failed += int(failed)
        return s

    def open_reservations(self) -> int:
        return len(self._caps)


@dataclass(frozen=True)
class Ask:
    """A priced request, before its cap is reserved (:meth:`IngressMarket.price`)."""

    threshold_tokens: float
    row: tuple  # (threshold, spread, runaway share, weight), and the length bin for clear-cost-emp
    market_cap_tokens: int
    cap_tokens: int  # the market cap within the client's cap
    new_arrival: bool
    tenant: str
    quote: PriceQuote
    group: int = 1  # choices decided as one (clear_core.decision, "Groups and floors")
    floor_tokens: int = 1  # the least cap worth reserving
    client_cap_tokens: int | None = None  # the most the client accepts (an exploration probe's bound)


@dataclass
class IngressMarket:
    """One ingress replica's decisions from a quote and a lease (module docstring)."""

    policy: Policy
    owner: str
    refund_unused: bool
    context_limit_tokens: int | None = None
    lease_block_tokens: int = 65536  # the lease the replica tries to hold available
    tenant_weights: dict = field(default_factory=dict)
    lengths: tuple = ()  # clear-cost-emp: the calibration's length histograms (the allocator's, same order)
    exploration: Exploration | None = None  # probes of would-be-abandoned requests (clear_core.exploration)
    quote: PriceQuote | None = None
    lease: LeaseBook = field(init=False)

    def __post_init__(self):
        if not isinstance(self.policy, ServableMarket):
            raise InvalidInputError("policy", self.policy.name, f"decisions from a price quote support "
                                    f"{', '.join(SERVABLE_POLICIES)}")
        self.lease = LeaseBook(self.refund_unused)
        self._arrivals = ArrivalMemory()
        self._pending: list = []  # arrivals not yet acknowledged, oldest first
        self._first_seq = 0  # number of self._pending[0]
        self._books = TenantBooks(self.tenant_weights, count_configured=False)
        self.explored = ExplorationBooks()
        self.lease_target_tokens = self.lease_block_tokens

    # -- deciding ------------------------------------------------------------------

    def price(self, threshold_tokens: float, *, log_sigma: float = 0.0, runaway: float = 0.0,
              tenant: str = DEFAULT_TENANT, client_cap_tokens: int | None = None, arrival_key: str | None = None,
              retry: bool = False, now: float = 0.0, length_bin: int | None = None, group: int = 1,
              floor_tokens: int = 1) -> Ask:
        """The request's cap at the current quote (nothing reserved yet). ``length_bin`` (clear-cost-emp
        only) indexes ``lengths``; ``threshold_tokens`` is then the raw prediction the histogram is relative to.
        ``group`` and ``floor_tokens`` as in :meth:`OnlineMarket.request <clear_core.online_market.OnlineMarket.request>`."""
        if self.quote is None:
            raise InvalidInputError("quote", None, "no price quote yet (the first report was not answered)")
        w = self._books.weight(tenant)
        row = request_row(self.policy, threshold_tokens, log_sigma=log_sigma, runaway=runaway, weight=w,
                          length_bin=length_bin, client_cap_tokens=client_cap_tokens, lengths=self.lengths)
        bins = [int(row[4])] if self.policy.prices_length_histograms else None
        market_cap = int(caps_at_quote(self.policy, self.quote, [row[0]], log_sigma=[row[1]], runaway=[row[2]],
                                       weights=[w], context_limit_tokens=self.context_limit_tokens,
                                       length_bins=bins, lengths=self.lengths)[0])
        cap = usable_cap(market_cap if client_cap_tokens is None else min(market_cap, int(client_cap_tokens)),
                         group, floor_tokens)
        new = self._arrivals.is_new(arrival_key, retry, now)
        if new:  # new demand, whatever its outcome: it credits a per-query budget and enters the window
            self._pending.append(row)
            if len(self._pending) > MAX_PENDING_ARRIVALS:  # the allocator is unreachable: keep the newest
                drop = len(self._pending) - MAX_PENDING_ARRIVALS
                del self._pending[:drop]
                self._first_seq += drop
        return Ask(float(threshold_tokens), row, market_cap, cap, new, tenant, self.quote, int(group),
                   int(floor_tokens), None if client_cap_tokens is None else int(client_cap_tokens))

    def shortfall(self, ask: Ask) -> int:
        """Tokens the lease lacks for ``ask``'s cap (0: it fits, or the request is insolvent)."""
        return max(ask.cap_tokens - self.lease.available, 0) if ask.cap_tokens > 0 else 0

    def admit(self, ask: Ask, rid: str, *, refill_s: float = math.inf) -> Decision:
        """Reserve ``ask``'s cap in the lease, cut it to the lease, or abandon it.

        ``refill_s``: when the allocator expects the pool to cover a shortfall
        (the Retry-After of a pool-empty abandonment).
        """
        q = ask.quote
        quote = dict(market_cap_tokens=ask.market_cap_tokens, shadow_price=q.shadow_price,
                     reservation_price=q.reservation_price, threshold_tokens=ask.threshold_tokens,
                     budget_per_query_tokens=q.budget_per_query_tokens, window_size=q.window_size,
                     new_arrival=ask.new_arrival, tenant=ask.tenant)
        if ask.cap_tokens <= 0:
            cap = probe_cap(self.exploration, self.explored, rid, ask.threshold_tokens, ask.client_cap_tokens,
                            self.context_limit_tokens, self.lease.available, ask.group, ask.floor_tokens)
            if cap <= 0:
                return self._abandon(ask, DecisionReason.INSOLVENT, quote, q.turnover_s, math.inf)
            reason = DecisionReason.EXPLORED
        else:
            reason, cap = fit_to_pool(ask.cap_tokens, self.lease.available, ask.threshold_tokens, ask.group,
                                      ask.floor_tokens)
        if reason is DecisionReason.POOL_EMPTY:
            return self._abandon(ask, reason, quote, q.turnover_s, refill_s)
        self.lease.reserve(rid, int(cap))
        self._books.admitted(rid, ask.tenant, int(cap), new_arrival=ask.new_arrival)
        self.explored.admitted(rid, int(cap), reason is DecisionReason.EXPLORED)
        return Decision(reason=reason, cap_tokens=int(cap), **quote)

    def settle(self, rid: str, generated: int, *, failed: bool = False) -> Settlement | None:
        s = self.lease.settle(rid, generated, failed=failed)
        self._books.settled(rid, s)
        if s is not None:
            self.explored.settled(rid, s.generated)
        return s

    @property
    def tenants(self) -> dict[str, TenantStats]:
        """tenant -> this replica's counters (clear_core.tenants; reported cumulatively)."""
        return self._books.tenants

    def _abandon(self, ask: Ask, reason: DecisionReason, quote: dict, turnover_s: float, refill_s: float) -> Decision:
        if ask.new_arrival:
            self._books.abandoned(ask.tenant)
        return abandonment(reason, quote, turnover_s, refill_s)

    # -- reporting ----------------------------------------------------------------

    def want_tokens(self, extra: int = 0) -> int:
        """More lease to ask for: top the available part up to the target; for a cap that does not fit,
        what it lacks plus the target (the allocator lends what it can)."""
        if extra:
            return int(extra) + self.lease_target_tokens
        return max(self.lease_target_tokens - self.lease.available, 0)

    def report(self, extra_tokens: int = 0) -> LeaseReport:
        """The next report; what is held well beyond the target is given back first."""
        target = self.lease_target_tokens
        if extra_tokens == 0 and self.lease.available > target + target // 2:
            self.lease.give_back(self.lease.available - target)
        return LeaseReport(
            owner=self.owner, counters=self.lease.counters(), reserved=self.lease.reserved,
            first_seq=self._first_seq, arrivals=list(self._pending),
            tenants=self._books.snapshot(), want_tokens=self.want_tokens(extra_tokens),
            in_flight=self.lease.open_reservations(),
        )

    def apply(self, reply: LeaseReply) -> None:
        """Take the allocator's answer: the new quote, the lease's size, the arrivals it has."""
        if reply.revoked:
            raise InvalidInputError("lease", self.owner, "was revoked by the allocator")
        if self.quote is None or reply.quote.version >= self.quote.version or reply.quote.issued_at > self.quote.issued_at:
            self.quote = reply.quote
        self.lease.set_granted(reply.granted_total)
        if reply.lease_target_tokens is not None:
            self.lease_target_tokens = max(min(int(reply.lease_target_tokens), self.lease_block_tokens), 0)
        acked = max(min(reply.next_seq - self._first_seq, len(self._pending)), 0)
        del self._pending[:acked]
        self._first_seq += acked


def answer_report(market, report: LeaseReport, *, requote: bool = True, now: float | None = None) -> LeaseReply:
    """The allocator's side of a report (pure: ``market`` is its
    :class:`~clear_core.online_market.OnlineMarket`, whose ledger holds the leases).

    Reconciles the counters, absorbs the arrivals not absorbed yet (they credit
    per-query budget blocks and enter the pricing window) and the tenants'
    counters (the abandonment rate), lends what the report wants if the pool
    has it, and answers with a new quote (``requote``) or the last one.
    """
    ledger = market.ledger
    now = ledger.now() if now is None else now
    owner = str(report.owner)
    if ledger.is_revoked(owner):  # its charges since its last report still count (TokenLedger.late_report)
        ledger.late_report(owner, report.counters, int(report.reserved))
        return LeaseReply(quote=market.last_quote or market.quote(now), granted_total=0, next_seq=0, revoked=True)
    lease = ledger.reconcile(owner, report.counters, int(report.reserved), now)
    market.absorb_in_flight(owner, int(report.in_flight))
    skip = max(lease.arrivals - int(report.first_seq), 0)
    fresh = report.arrivals[skip:]
    market.absorb(fresh, now)
    lease.arrivals = max(lease.arrivals, int(report.first_seq) + len(report.arrivals))
    market.absorb_tenants(owner, report.tenants)
    want = max(int(report.want_tokens), 0)
    got = ledger.grant_lease(owner, want, now) if want else 0
    refill = ledger.seconds_until(want - got, now) if got < want else 0.0
    quote = market.quote(now) if (requote or market.last_quote is None) else market.last_quote
    return LeaseReply(quote=quote, granted_total=lease.granted, next_seq=lease.arrivals, refill_s=refill,
                      lease_target_tokens=lease_target(ledger, now))


#: Owners share the pool: each holds at most this fraction of what is left to price with, divided among them.
LEASE_SHARE = 0.25


def lease_target(ledger, now: float) -> int:
    """How much an owner should hold available: a share of the budget left, so that as the pool
    drains the tokens come back to it instead of idling in another owner's lease."""
    owners = max(ledger.state(now).owners, 1)
    return int(LEASE_SHARE * ledger.pricing_available(now) / owners)
