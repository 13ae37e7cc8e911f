"""Requests in flight: the float of open caps, and the second budget it puts on the caps.

A reserved cap comes back, mostly, as a refund when its request settles, but
while it is in flight it is out of the pool. With ``K`` requests in flight
the unspent pool (:meth:`~clear_core.ledger.TokenLedger.unspent`) has to
hold ``K + 1`` caps at a time, and caps that ignore this *float* run the pool
dry: an abundant price gives caps at the context limit, a few dozen of them
hold the whole block, and the next requests are cut or abandoned for want of
reservable tokens rather than because they are insolvent. A policy that
``prices_reservations`` (``clear-cost``, ``clear-cost-emp``) clears the
window with a second budget: its admitted caps may average at most
``unspent / (K + 1)`` (:meth:`InFlight.mean_cap_budget`), ``K`` the most open
reservations seen at a recent arrival (so a dip in concurrency does not
loosen it; :meth:`InFlight.concurrency`). That is a second price, on a token
held reserved, which shortens the caps of the requests a long cap buys little
for (:mod:`clear_core.empirical_market`, "A second budget";
docs/concepts.md, "Requests in flight: the reservation price").

The open reservations are the ledger's and, with decisions at the ingress,
those each replica last reported inside its lease (:mod:`clear_core.lease`).
Pacing still counts the open caps as spent (:mod:`clear_core.pacing` says
why).
"""

from __future__ import annotations

from collections import deque

from clear_core.errors import InvalidInputError
from clear_core.ledger import TokenLedger


class InFlight:
    """Open reservations now and at recent arrivals, and the mean cap they leave room for (module docstring).

    ``window_size``: recent arrivals whose open reservations are remembered
    (the pricing window's). ``prices_reservations``: the policy clears the
    second budget (otherwise :meth:`mean_cap_budget` is None).
    """

    def __init__(self, ledger: TokenLedger, *, window_size: int, prices_reservations: bool):
        self.ledger = ledger
        self.prices_reservations = bool(prices_reservations)
        self.seen: deque = deque(maxlen=max(window_size, 1))  # open reservations at recent arrivals
        self.leases: dict[str, int] = {}  # owner -> open reservations inside its lease (its last report)

    def in_flight(self) -> int:
        """Open reservations now: the ledger's and the leases' (as last reported)."""
        return self.ledger.in_flight + sum(self.leases.values())

    def arrived(self) -> None:
        """A new arrival: remember how many reservations were open when it came."""
        self.seen.append(self.in_flight())

    def concurrency(self) -> int:
        """Requests in flight the float is sized for: the most open reservations seen at a recent arrival
        (the allocator's own and those the ingress replicas last reported inside their leases)."""
        return max([self.in_flight(), *self.seen])

    def absorb(self, owner: str, open_reservations: int) -> None:
        """An ingress replica's open reservations inside its lease (its report)."""
        n = int(open_reservations)
        if n < 0:
            raise InvalidInputError("in_flight", open_reservations, "must be >= 0")
        self.leases[str(owner)] = n

    def forget_owner(self, owner: str) -> None:
        self.leases.pop(owner, None)

    def mean_cap_budget(self, now: float) -> float | None:
        """What each admitted cap may hold on average: ``unspent / (K + 1)`` with ``K`` requests in flight
        (:meth:`concurrency`); None when the policy does not price reservations or nothing is in flight."""
        k = self.concurrency()
        if not self.prices_reservations or k == 0:
            return None
        return float(max(self.ledger.unspent(now), 0) / (k + 1))
