"""The budget's books: a pure, synchronous ledger of one global token budget.

``granted`` tokens have been credited to the pool so far (how, is the
:class:`~clear_core.budget.Budget`'s business); ``reserved`` are held by
in-flight requests (their caps); ``spent`` are charged for requests that
ended. The **budget invariant**

    reserved + spent <= granted

holds after every command: :meth:`TokenLedger.reserve` refuses (raises
:class:`~clear_core.errors.BudgetExhaustedError`) whatever would break it. A
request that ends (:meth:`TokenLedger.settle`) releases its reservation and is
charged what it generated; the unused part of its cap is *refunded* (to the
pool when the budget says so, else only to the client's account).

Plain synchronous state with no concurrency of its own (the pattern of Text
Generation Inference's queue: a thin actor owns the state and serialises the
commands; the state itself is unit-tested without any actor). Snapshots
(:meth:`TokenLedger.snapshot` / :meth:`TokenLedger.restore`) let the books
survive an allocator restart.

Faults never charge for tokens nobody received:

* a request that ended in an error settles with ``failed=True``: it is charged
  the tokens it generated (what its client received), whatever the budget's
  refund rule, and the rest of its cap returns to the pool;
* a reservation carries the *owner* that made it (an ingress replica), and an
  owner holds a *lease* it renews (:meth:`TokenLedger.renew`). When a lease
  lapses (the replica died), :meth:`TokenLedger.release_lapsed` *recovers* its
  open reservations at once: charged nothing, the whole cap back to the pool;
* a reservation without an owner, or whose owner keeps renewing but never
  settles it, expires after the budget's ``reservation_ttl_s`` and is charged
  in full (the backstop: a reservation can never leak for ever).

Budget leases (decisions at the ingress, :mod:`clear_core.lease`): an owner
may also hold *tokens* on lease (:meth:`TokenLedger.grant_lease`): a block of
the pool it reserves against locally, without asking for each request. The
invariant then reads ``reserved + leased + spent <= granted`` (``leased`` the
tokens lent out and not yet reported spent or given back). The owner reports
cumulative counters (:meth:`TokenLedger.reconcile`: charged, given back,
reserved inside its lease, and the token totals); the ledger applies the
change since the last report, so a report may be repeated or lost without
counting anything twice. When its liveness lease lapses, the owner's token
lease comes back to the pool (:meth:`TokenLedger.release_lapsed`) and the
owner is *revoked*: a later report from it is refused. Only what it had
charged and not reported yet is lost, at most its lease.

Settling is idempotent: a settle of a reservation that is no longer open
(settled already, recovered, expired, or never made because the reserve
failed) changes nothing. Every token a cap takes ends in exactly one of
generated, refunded or expired, so ``allocated = generated + refunded +
expired + reserved`` at all times (:attr:`LedgerState.reconciles`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clear_core.budget import Budget, PerQueryBudget, TokenBucketBudget, budget_from_dict
from clear_core.errors import BudgetExhaustedError, InvalidInputError, UnknownReservationError


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
    expired_tokens_total: int = 0  # caps of the expired reservations (charged in full)
    recovered_total: int = 0  # reservations of lapsed owners given back (charged nothing)
    recovered_tokens_total: int = 0  # their caps (part of refunded_total)
    failed_total: int = 0  # requests settled as failed (charged only what they generated)
    owners: int = 0  # owners (ingress replicas) holding a live lease
    leased: int = 0  # tokens lent to owners on budget leases, not yet reported charged or given back
    lease_reserved: int = 0  # caps the owners reported open inside their leases
    reclaimed_lease_tokens_total: int = 0  # leased tokens taken back from owners whose lease lapsed
    late_charged_tokens_total: int = 0  # charged by settles that came after their reservation was recovered
    late_uncharged_tokens_total: int = 0  # of those settles' tokens, the ones the pool no longer held
    corrected_tokens_total: int = 0  # charges taken back: clients that left before their answer (correct)

    @property
    def invariant_holds(self) -> bool:
        return self.reserved + self.leased + self.spent <= self.granted + 1e-6

    @property
    def reconciles(self) -> bool:
        """Every allocated token is generated, refunded, expired or still reserved (centrally or in a lease)."""
        return self.allocated_total == (
            self.generated_total + self.refunded_total + self.expired_tokens_total + self.reserved
            + self.lease_reserved
        )


@dataclass(frozen=True)
class Settlement:
    cap: int  # tokens the request had reserved
    generated: int  # tokens it generated (clipped to the cap)
    refunded: int  # cap - generated
    charged: int  # what the pool was charged (generated, or the cap without refunds)

    @classmethod
    def of(cls, cap: int, generated: int, *, refund_unused: bool, failed: bool = False) -> Settlement:
        """The charging rule, one place for the ledger and the leases: a request is charged what it
        generated (clipped to its cap) when the budget refunds unused caps or the request failed (its
        client got only that), else its whole cap."""
        used = min(max(int(generated), 0), int(cap))
        return cls(cap=int(cap), generated=used, refunded=int(cap) - used,
                   charged=used if (refund_unused or failed) else int(cap))


#: An owner (ingress replica) that has not renewed its lease for this long is presumed dead, s.
DEFAULT_LEASE_TTL_S = 15.0


#: Counters an owner reports about its budget lease, cumulative since the lease was opened.
LEASE_COUNTERS = ("charged", "returned", "allocated", "generated", "refunded", "failed")
#: Recovered reservations remembered (rid -> cap), so that a settle arriving after its owner's lease lapsed
#: is still charged (TokenLedger.settle).
LAPSED_MEMORY = 1024
#: Settles remembered for a correction (TokenLedger.correct): how many, and for how long, s.
CORRECTABLE_SETTLES = 4096
CORRECTABLE_S = 60.0
#: Revoked owners remembered (a report from one of them is refused).
REVOKED_MEMORY = 4096


@dataclass
class TokenLease:
    """What one owner holds on lease, and the cumulative counters it last reported."""

    granted: int = 0  # tokens lent to it so far
    charged: int = 0  # of them, charged for requests that ended (spent)
    returned: int = 0  # of them, given back to the pool
    reserved: int = 0  # open caps inside the lease (its last report)
    allocated: int = 0
    generated: int = 0
    refunded: int = 0
    failed: int = 0
    arrivals: int = 0  # the owner's arrivals absorbed so far (its next arrival's number)

    @property
    def outstanding(self) -> int:
        return self.granted - self.charged - self.returned


@dataclass
class _Reservation:
    cap: int  # tokens held
    created: float  # clock time of the reservation, s
    owner: str | None = None  # who made it (an ingress replica's lease), None: only the TTL ends it


class TokenLedger:
    """The budget's books; every method keeps ``reserved + spent <= granted``."""

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S):
        if not (isinstance(lease_ttl_s, (int, float)) and lease_ttl_s > 0):
            raise InvalidInputError("lease_ttl_s", lease_ttl_s, "must be > 0")
        self.budget = budget
        self.lease_ttl_s = float(lease_ttl_s)
        self._clock = clock
        self._reservations: OrderedDict[str, _Reservation] = OrderedDict()
        self._leases: dict[str, float] = {}  # owner -> clock time of its last renewal
        self._expired_tokens = 0
        self._recovered = 0
        self._recovered_tokens = 0
        self._failed = 0
        self._reserved = 0
        self._spent = 0
        self._arrivals = 0
        self._arrival_base = 0  # arrivals before the budget in force took effect (rebudget)
        self._allocated = 0
        self._generated = 0
        self._refunded = 0
        self._expired = 0
        self._last_refill = clock()
        self._granted = float(budget.initial_grant())
        self._token_leases: dict[str, TokenLease] = {}
        self._leased = 0  # sum of the leases' outstanding tokens
        # Revoked owners, with their lease's counters as last reported (None: none known), for a late report.
        self._revoked: OrderedDict[str, TokenLease | None] = OrderedDict()
        self._reclaimed = 0
        self._lapsed: OrderedDict[str, int] = OrderedDict()  # recovered reservations: rid -> cap
        self._settled: OrderedDict[str, tuple[float, Settlement]] = OrderedDict()  # recent settles, to correct
        self._corrected_tokens = 0  # charges taken back by corrections
        self._late_charged = 0  # tokens charged by settles that arrived after their reservation was recovered
        self._late_uncharged = 0  # of such settles' tokens, those the pool no longer held (not charged)

    # -- budget inflow -------------------------------------------------------

    def _refill(self, now: float) -> None:
        dt = max(0.0, now - self._last_refill)
        self._last_refill = max(self._last_refill, now)
        self._granted += self.budget.grant_on_refill(self._granted - self._spent, dt)

    def arrive(self) -> None:
        """Count one arriving request (credits a new block of a per-query budget)."""
        self._arrivals += 1
        self._granted += self.budget.grant_on_arrival(self.budget_arrivals)

    @property
    def arrivals(self) -> int:
        return self._arrivals

    @property
    def budget_arrivals(self) -> int:
        """Arrivals since the budget in force took effect: what its per-query blocks count."""
        return self._arrivals - self._arrival_base

    def rebudget(self, budget: Budget, now: float | None = None) -> None:
        """Continue these books under another budget (a changed config).

        What happened stays: spent, reserved, leased, the counters, the open reservations and leases.
        What was credited stays credited. The new budget governs what is credited from now on:

        * per-query: from the next block. The block in progress keeps the credit it opened with, and the
          first arrival after it opens a block of the new size (the next arrival, when the old budget was a
          rate);
        * rate: the bucket keeps its level (granted less spent) and refills at the new rate from now; a
          level above the new burst is cut to it, but never below what is reserved or leased, so nothing
          in flight loses its tokens.

        A changed ``refund_unused`` or ``reservation_ttl_s`` applies to the reservations that settle or
        expire from now on, the open ones included.
        """
        now = self._clock() if now is None else now
        self._refill(now)  # the old budget's refill up to this instant
        old = self.budget
        if isinstance(budget, PerQueryBudget):
            if isinstance(old, PerQueryBudget):
                w, done = old.window_queries, self.budget_arrivals
                if done > 0:  # (done <= 0: still in a block an earlier budget opened, which stays the one to end)
                    self._arrival_base += -(-done // w) * w  # the end of the block in progress
            else:
                self._arrival_base = self._arrivals
        elif isinstance(budget, TokenBucketBudget):
            committed = self._reserved + self._leased
            self._granted = min(self._granted, self._spent + max(float(budget.burst_tokens), committed))
        self.budget = budget
        self._last_refill = now

    def now(self) -> float:
        """The ledger's clock (monotonic seconds, or a test's fake clock)."""
        return self._clock()

    def unspent(self, now: float | None = None) -> int:
        """Granted and not spent: the pool plus every token held in reservations and leases."""
        return self.available(now) + self._reserved + self._leased

    @property
    def in_flight(self) -> int:
        """Open reservations."""
        return len(self._reservations)

    # -- commands ------------------------------------------------------------

    def available(self, now: float | None = None) -> int:
        self._refill(self._clock() if now is None else now)
        return int(math.floor(self._granted - self._reserved - self._leased - self._spent + 1e-9))

    def pricing_available(self, now: float | None = None) -> int:
        """The pool plus what the leases hold and have not reserved: what is left to price with."""
        held = sum(max(lease.outstanding - lease.reserved, 0) for lease in self._token_leases.values())
        return self.available(now) + held

    def reserve(self, rid: str, cap: int, now: float | None = None, owner: str | None = None) -> None:
        """Hold ``cap`` tokens for request ``rid`` (made by ``owner``); raise if they are not available."""
        now = self._clock() if now is None else now
        if not isinstance(cap, (int, np.integer)) or cap < 0:
            raise InvalidInputError("cap", cap, "must be an integer >= 0")
        if rid in self._reservations:
            raise InvalidInputError("reservation id", rid, "already holds a reservation")
        cap = int(cap)
        avail = self.available(now)
        if cap > avail:
            raise BudgetExhaustedError(f"cap {cap} exceeds the available budget {avail}")
        if owner is not None:
            self.renew(owner, now)
        self._reservations[rid] = _Reservation(cap=cap, created=now, owner=owner)
        self._reserved += cap
        self._allocated += cap

    def settle(self, rid: str, generated: int, *, failed: bool = False) -> Settlement:
        """End request ``rid`` having generated ``generated`` tokens; refund the rest.

        ``failed``: the request was answered with an error; it is charged only
        what it generated (its client received it), even when the budget does
        not refund unused caps. Raises :class:`UnknownReservationError` when
        ``rid`` holds no open reservation (the books are unchanged).
        """
        if not isinstance(generated, (int, np.integer)) or generated < 0:
            raise InvalidInputError("generated", generated, "must be an integer >= 0")
        res = self._reservations.get(rid)
        if res is None and rid in self._lapsed:
            return self._late_settle(rid, int(generated), failed)
        if res is None:
            raise UnknownReservationError(f"no open reservation {rid!r} (settled twice, recovered or expired)")
        del self._reservations[rid]
        s = Settlement.of(res.cap, generated, refund_unused=self.budget.refund_unused, failed=failed)
        self._refill(self._clock())  # bucket level before the refund returns
        self._reserved -= s.cap
        self._spent += s.charged
        self._generated += s.generated
        self._refunded += s.refunded
        self._failed += int(failed)
        self._remember_settled(rid, s)
        return s

    def _remember_settled(self, rid: str, s: Settlement) -> None:
        now = self._clock()
        self._settled[rid] = (now, s)
        self._settled.move_to_end(rid)
        while self._settled and (len(self._settled) > CORRECTABLE_SETTLES
                                 or now - next(iter(self._settled.values()))[0] > CORRECTABLE_S):
            self._settled.popitem(last=False)

    def correct(self, rid: str, received: int) -> Settlement | None:
        """The client of a settled request received only ``received`` of the tokens it was charged for (it
        left while its answer waited for the settle's acknowledgement): it is charged that, as a failed
        request is, and the rest returns to the pool. Only lowers a charge; once per request; None (books
        unchanged) for a request not settled within the last ``CORRECTABLE_S`` or already corrected."""
        if not isinstance(received, (int, np.integer)) or received < 0:
            raise InvalidInputError("received", received, "must be an integer >= 0")
        entry = self._settled.pop(rid, None)
        if entry is None or self._clock() - entry[0] > CORRECTABLE_S:
            return None
        old = entry[1]
        new = Settlement.of(old.cap, min(int(received), old.generated), refund_unused=True, failed=True)
        back = old.charged - new.charged
        if back <= 0:
            return old
        self._refill(self._clock())
        self._spent -= back
        self._generated -= old.generated - new.generated
        self._refunded += old.generated - new.generated
        self._failed += 1
        self._corrected_tokens += back
        return new

    def late_report(self, owner: str, counters: dict, reserved: int) -> int:
        """A report from an owner whose lease lapsed and was revoked (it was cut off, not dead): what it
        charged since its last report is charged now, from the pool as far as the pool holds it (the rest is
        counted in ``late_uncharged_tokens_total``), and its counters enter the books. Its arrivals are not
        absorbed, and the caps still open in it stay recovered (charged nothing). Returns the tokens charged;
        a repeated report changes nothing."""
        lease = self._revoked.get(owner)
        if lease is None:
            return 0
        new = {k: max(int(counters.get(k, 0)), getattr(lease, k)) for k in LEASE_COUNTERS}
        open_caps = max(int(reserved), 0)
        due = new["charged"] - lease.charged
        self._refill(self._clock())
        take = min(due, max(self.available(), 0))
        self._spent += take
        self._late_charged += take
        self._late_uncharged += due - take
        self._allocated += new["allocated"] - lease.allocated
        self._generated += new["generated"] - lease.generated
        # The caps open at its last report were counted refunded (recovered) at the revocation; now its
        # settles say what became of them, and the caps open now are the ones recovered.
        self._refunded += (new["refunded"] + open_caps) - (lease.refunded + lease.reserved)
        self._recovered_tokens += open_caps - lease.reserved
        self._failed += new["failed"] - lease.failed
        for k in LEASE_COUNTERS:
            setattr(lease, k, new[k])
        lease.reserved = open_caps
        return take

    def _late_settle(self, rid: str, generated: int, failed: bool) -> Settlement:
        """A settle of a reservation recovered when its owner's lease lapsed (the owner was alive but cut off
        for longer than the lease TTL). Its cap went back to the pool, charged nothing; the tokens its
        client did receive are charged now, from the pool, as far as the pool still holds them (the
        invariant first: what it no longer holds is counted in ``late_uncharged_tokens_total``)."""
        cap = self._lapsed.pop(rid)
        s = Settlement.of(cap, generated, refund_unused=True, failed=failed)  # what the client received
        self._refill(self._clock())
        take = min(s.generated, max(self.available(), 0))
        self._spent += take
        self._generated += take  # out of what recovery had counted as refunded
        self._refunded -= take
        self._recovered_tokens -= take
        self._late_charged += take
        self._late_uncharged += s.generated - take
        self._failed += int(failed)
        return Settlement(cap=cap, generated=take, refunded=cap - take, charged=take)

    # -- leases of the owners (ingress replicas) -----------------------------------

    def renew(self, owner: str, now: float | None = None) -> int:
        """Renew ``owner``'s lease; returns how many open reservations it holds."""
        self._leases[str(owner)] = self._clock() if now is None else now
        return sum(1 for r in self._reservations.values() if r.owner == owner)

    # -- budget leases (decisions at the ingress) -------------------------------------

    def token_leases(self) -> dict[str, TokenLease]:
        return dict(self._token_leases)

    def token_lease(self, owner: str) -> TokenLease | None:
        return self._token_leases.get(owner)

    def is_revoked(self, owner: str) -> bool:
        return owner in self._revoked

    def grant_lease(self, owner: str, tokens: int, now: float | None = None) -> int:
        """Lend ``owner`` up to ``tokens`` more of the pool; returns how many it got (maybe 0)."""
        now = self._clock() if now is None else now
        if owner in self._revoked:
            raise InvalidInputError("owner", owner, "its lease was revoked (it lapsed); open a new one")
        if not isinstance(tokens, (int, np.integer)) or tokens < 0:
            raise InvalidInputError("tokens", tokens, "must be an integer >= 0")
        self.renew(owner, now)
        given = min(int(tokens), max(self.available(now), 0))
        lease = self._token_leases.setdefault(owner, TokenLease())
        lease.granted += given
        self._leased += given
        return given

    def reconcile(self, owner: str, counters: dict, reserved: int, now: float | None = None) -> TokenLease:
        """Apply an owner's report: cumulative ``counters`` (:data:`LEASE_COUNTERS`) and its open caps.

        Counters only move forward (an older or repeated report changes
        nothing); charged plus given back never exceed what was lent (a report
        claiming more is clipped to the lease: the ledger, not the owner, is
        the authority on what was lent).
        """
        now = self._clock() if now is None else now
        if owner in self._revoked:
            raise InvalidInputError("owner", owner, "its lease was revoked (it lapsed); open a new one")
        self.renew(owner, now)
        lease = self._token_leases.setdefault(owner, TokenLease())
        new = {k: max(int(counters.get(k, 0)), getattr(lease, k)) for k in LEASE_COUNTERS}
        room = lease.granted - lease.charged - lease.returned
        d_charged = min(new["charged"] - lease.charged, room)
        d_returned = min(new["returned"] - lease.returned, room - d_charged)
        self._refill(now)  # the bucket level before the tokens move
        lease.charged += d_charged
        lease.returned += d_returned
        self._leased -= d_charged + d_returned
        self._spent += d_charged
        for k, total in (("_allocated", "allocated"), ("_generated", "generated"), ("_refunded", "refunded"),
                         ("_failed", "failed")):
            setattr(self, k, getattr(self, k) + new[total] - getattr(lease, total))
            setattr(lease, total, new[total])
        lease.reserved = max(min(int(reserved), lease.outstanding), 0)
        return lease

    def release_lapsed(self, now: float | None = None) -> list[tuple[str, int]]:
        """Recover the reservations of owners whose lease lapsed: charged nothing, caps back to the pool.

        Returns the ``(rid, cap)`` recovered; the lapsed owners are forgotten
        (an owner that comes back simply renews again), except those that held
        a budget lease: its tokens return to the pool and the owner is revoked.
        """
        now = self._clock() if now is None else now
        lapsed = {o for o, t in self._leases.items() if now - t >= self.lease_ttl_s}
        if not lapsed:
            return []
        for o in lapsed:
            del self._leases[o]
        self._refill(now)
        for o in sorted(lapsed & self._token_leases.keys()):
            lease = self._token_leases.pop(o)
            self._leased -= lease.outstanding
            self._reclaimed += lease.outstanding
            # Its open caps were never settled with us: recovered (charged nothing), like a reservation's.
            self._refunded += lease.reserved
            self._recovered_tokens += lease.reserved
            self._revoked[o] = lease
            while len(self._revoked) > REVOKED_MEMORY:
                self._revoked.popitem(last=False)
        gone = [(rid, r.cap) for rid, r in self._reservations.items() if r.owner in lapsed]
        for rid, cap in gone:
            del self._reservations[rid]
            self._lapsed[rid] = cap
            while len(self._lapsed) > LAPSED_MEMORY:
                self._lapsed.popitem(last=False)
            self._reserved -= cap
            self._refunded += cap
            self._recovered += 1
            self._recovered_tokens += cap
        return gone

    def expire(self, now: float | None = None) -> list[str]:
        """Charge in full and drop reservations older than the TTL; return their ids."""
        now = self._clock() if now is None else now
        gone = []
        ttl = self.budget.reservation_ttl_s
        while self._reservations:
            rid, res = next(iter(self._reservations.items()))
            if now - res.created < ttl:
                break  # ordered by creation time
            self._reservations.popitem(last=False)
            self._reserved -= res.cap
            self._spent += res.cap
            self._expired += 1
            self._expired_tokens += res.cap
            gone.append(rid)
        return gone

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
            expired_tokens_total=self._expired_tokens,
            recovered_total=self._recovered,
            recovered_tokens_total=self._recovered_tokens,
            failed_total=self._failed,
            owners=len(self._leases),
            leased=self._leased,
            lease_reserved=sum(lease.reserved for lease in self._token_leases.values()),
            reclaimed_lease_tokens_total=self._reclaimed,
            late_charged_tokens_total=self._late_charged,
            late_uncharged_tokens_total=self._late_uncharged,
            corrected_tokens_total=self._corrected_tokens,
        )

    # -- durability ----------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict:
        """The books as plain JSON-able values, for surviving an allocator restart.

        Times are stored as ages (the clock is per process); see :meth:`restore`.
        """
        now = self._clock() if now is None else now
        self._refill(now)  # the bucket level as of this instant
        return {
            "budget": self.budget.to_dict(),
            "granted": self._granted,
            "spent": self._spent,
            "arrivals": self._arrivals,
            "arrival_base": self._arrival_base,
            "allocated": self._allocated,
            "generated": self._generated,
            "refunded": self._refunded,
            "expired": self._expired,
            "expired_tokens": self._expired_tokens,
            "recovered": self._recovered,
            "recovered_tokens": self._recovered_tokens,
            "failed": self._failed,
            "lease_ttl_s": self.lease_ttl_s,
            "reservations": [[rid, r.cap, max(0.0, now - r.created), r.owner] for rid, r in self._reservations.items()],
            "token_leases": {o: vars(lease).copy() for o, lease in self._token_leases.items()},
            "revoked": list(self._revoked),
            "revoked_leases": {o: vars(lease).copy() for o, lease in self._revoked.items() if lease is not None},
            "reclaimed": self._reclaimed,
            "lapsed": [[rid, cap] for rid, cap in self._lapsed.items()],
            "late_charged": self._late_charged,
            "late_uncharged": self._late_uncharged,
            "corrected": self._corrected_tokens,
        }

    @classmethod
    def restore(cls, snap: dict, clock: Callable[[], float] = time.monotonic) -> TokenLedger:
        """Rebuild the books from :meth:`snapshot`, conservatively.

        Open reservations stay reserved (their requests may still settle, or
        expire after the TTL); the time the allocator was down counts neither
        as reservation age nor as bucket refill, so a restart can only make the
        budget tighter, never looser. Every owner of an open reservation gets
        a fresh lease: a live one renews it, a dead one lapses a lease later.
        """
        led = cls(budget_from_dict(snap["budget"]), clock, lease_ttl_s=float(snap.get("lease_ttl_s", DEFAULT_LEASE_TTL_S)))
        now = clock()
        led._granted = float(snap["granted"])
        led._spent = int(snap["spent"])
        led._arrivals = int(snap["arrivals"])
        led._arrival_base = int(snap.get("arrival_base", 0))
        led._allocated = int(snap["allocated"])
        led._generated = int(snap["generated"])
        led._refunded = int(snap["refunded"])
        led._expired = int(snap["expired"])
        led._expired_tokens = int(snap.get("expired_tokens", 0))
        led._recovered = int(snap.get("recovered", 0))
        led._recovered_tokens = int(snap.get("recovered_tokens", 0))
        led._failed = int(snap.get("failed", 0))
        for rid, cap, age, *rest in snap["reservations"]:
            owner = rest[0] if rest else None
            led._reservations[str(rid)] = _Reservation(cap=int(cap), created=now - float(age), owner=owner)
            led._reserved += int(cap)
            if owner is not None:
                led._leases[owner] = now
        for o, d in snap.get("token_leases", {}).items():
            lease = TokenLease(**{k: int(v) for k, v in d.items()})
            led._token_leases[o] = lease
            led._leased += lease.outstanding
            led._leases[o] = now  # a fresh liveness lease: a live owner reports, a dead one lapses
        kept = snap.get("revoked_leases", {})
        led._revoked.update((o, TokenLease(**{k: int(v) for k, v in kept[o].items()}) if o in kept else None)
                            for o in snap.get("revoked", []))
        led._reclaimed = int(snap.get("reclaimed", 0))
        led._lapsed.update((str(rid), int(cap)) for rid, cap in snap.get("lapsed", []))
        led._late_charged = int(snap.get("late_charged", 0))
        led._late_uncharged = int(snap.get("late_uncharged", 0))
        led._corrected_tokens = int(snap.get("corrected", 0))
        led._last_refill = now
        if not led.state(now).invariant_holds:
            raise InvalidInputError("ledger snapshot", "reserved + spent > granted", "refusing to restore broken books")
        return led

    def seconds_until(self, tokens: float, now: float | None = None) -> float:
        """How long until ``tokens`` could be available (inf if never by refill alone)."""
        return self.budget.seconds_until(tokens - self.available(now), tokens)
