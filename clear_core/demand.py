"""Recent demand: the rolling window the online market clears against, and the memory that tells a retry
from new demand.

Why a rolling window
--------------------
Requests arrive one by one, so a market with only the requests currently in
flight is *thin*: a lone request would always clear at price 0 and get its
peak. The market keeps the last ``window_size`` predicted thresholds it has
seen (admitted or not, :class:`DemandWindow`) and clears the market of
``window + [new request]`` with budget ``b * (len(window) + 1)`` (the paper's
batch problem, Eq. 14, on a sample of recent demand); the new request gets
its cap from that clearing and the market's shadow price is the price quoted.
When traffic is stationary the window is a sample of the same distribution as
the batch, so the clearing price and every cap converge to those of the
offline batch (the per-query budget and the threshold distribution are what
fix the price). The per-query budget ``b`` comes from pacing
(:mod:`clear_core.pacing`).

What each request brings
------------------------
A request brings its predicted threshold and, for the policies that price a
length *distribution* (``clear-cost``, :mod:`clear_core.consumption`), its
calibrated spread and runaway share, and its tenant's weight (the paper's
alpha_i of Eq. 2: a tenant worth more buys tokens first at the same price;
:mod:`clear_core.tenants`). The window keeps all four, so the clearing sees
the recent demand as it was. ``clear-cost-emp``
(:mod:`clear_core.empirical_market`) prices each request's *empirical* length
histogram instead: the market holds the calibration's histograms
(``lengths``), each request names its bin (``length_bin``) and the window
keeps it as a fifth column. These are the demand rows of
:mod:`clear_core.servable`; :func:`request_row` and :func:`reported_row` build
and check them.

Retries
-------
A retry is not new demand. A request may carry an *arrival key* (the client's
``Idempotency-Key``, or a fingerprint of its body); a request marked as a
retry whose key arrived within the last :data:`ARRIVAL_MEMORY_S` is priced
again but is not a new arrival (:class:`ArrivalMemory`): it credits no
per-query budget and does not enter the pricing window, the arrival rate or
the abandonment rate a second time. What an abandonment tells the client
about retrying is in :mod:`clear_core.decision`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from clear_core.empirical_market import checked_length_bins
from clear_core.errors import InvalidInputError
from clear_core.servable import ServableMarket

#: Recent thresholds each request is priced against (the pricing window).
DEFAULT_WINDOW_SIZE = 256
#: Arrival keys remembered to recognise retries: how many, and for how long, s.
ARRIVAL_MEMORY = 8192
ARRIVAL_MEMORY_S = 600.0
#: The newest arrival keys a snapshot keeps (an allocator restart forgets the older ones): the retries a
#: restart provokes come within seconds, and the snapshot is written after every command.
ARRIVAL_SNAPSHOT_KEYS = 2048


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

    def snapshot(self, now: float, limit: int = ARRIVAL_SNAPSHOT_KEYS) -> list:
        """The newest ``limit`` keys as ``[key, age in s]``, oldest first (ages: the clock is per process)."""
        newest = list(self._keys.items())[-limit:] if limit > 0 else []
        return [[k, round(max(now - t, 0.0), 3)] for k, t in newest]

    def restore(self, items, now: float) -> None:
        """Remember the keys of :meth:`snapshot` (the time the allocator was down does not age them)."""
        for key, age in items:
            self._keys[str(key)] = now - float(age)
            self._keys.move_to_end(str(key))


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


def request_row(market: ServableMarket, threshold_tokens: float, *, log_sigma: float, runaway: float,
                weight: float, length_bin: int | None, client_cap_tokens: int | None, lengths: tuple) -> tuple:
    """An arriving request's demand row, checked (:func:`check_request`, and its bin against ``lengths``
    for a market that prices length histograms)."""
    check_request(threshold_tokens, log_sigma, runaway, client_cap_tokens)
    if market.prices_length_histograms:
        length_bin = int(checked_length_bins([length_bin], len(lengths))[0])
    return market.demand_row(threshold_tokens, log_sigma, runaway, weight, length_bin)


def reported_row(market: ServableMarket, row, lengths: tuple) -> tuple:
    """A demand row an ingress replica reported, checked: ``(threshold, spread, runaway share, weight)``
    and the length bin for a market that prices histograms (extra values are ignored)."""
    if len(row) < market.row_width:
        raise InvalidInputError("report row", len(row), f"{market.name} needs {market.row_width} values")
    tau, sig, rho, w = (float(v) for v in row[:4])
    check_request(tau, sig, rho, None)
    if not (math.isfinite(w) and w > 0):
        raise InvalidInputError("weight", w, "must be finite and > 0")
    length_bin = None
    if market.prices_length_histograms:
        length_bin = int(checked_length_bins([row[4]], len(lengths))[0])
    return market.demand_row(tau, sig, rho, w, length_bin)
