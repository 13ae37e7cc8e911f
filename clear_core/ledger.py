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

Reservations that are never settled (an ingress replica died) expire after the
budget's ``reservation_ttl_s`` and are charged in full, so a reservation can
never leak for ever; a late settle of an expired reservation is ignored.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clear_core.budget import Budget, budget_from_dict
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
    cap: int  # tokens held
    created: float  # clock time of the reservation, s


class TokenLedger:
    """The budget's books; every method keeps ``reserved + spent <= granted``."""

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic):
        self.budget = budget
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
        self._granted = float(budget.initial_grant())

    # -- budget inflow -------------------------------------------------------

    def _refill(self, now: float) -> None:
        dt = max(0.0, now - self._last_refill)
        self._last_refill = max(self._last_refill, now)
        self._granted += self.budget.grant_on_refill(self._granted - self._spent, dt)

    def arrive(self) -> None:
        """Count one arriving request (credits a new block of a per-query budget)."""
        self._arrivals += 1
        self._granted += self.budget.grant_on_arrival(self._arrivals)

    @property
    def arrivals(self) -> int:
        return self._arrivals

    def now(self) -> float:
        """The ledger's clock (monotonic seconds, or a test's fake clock)."""
        return self._clock()

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
        charged = used if self.budget.refund_unused else res.cap
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
        ttl = self.budget.reservation_ttl_s
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
            "budget": self.budget.to_dict(),
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
        led = cls(budget_from_dict(snap["budget"]), clock)
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
        return self.budget.seconds_until(tokens - self.available(now), tokens)
