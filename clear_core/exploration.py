"""Exploration: a few would-be-abandoned requests are served at a probe cap, so the learner sees them.

A market that learns its lengths from what it serves never sees the requests
it abandons: if the model says a kind of prompt is long, the market abandons
it, and nothing it observes can say otherwise. So a small share of the
requests the market would abandon as insolvent is admitted instead, at a
*probe cap*: the request's predicted threshold (the median of its length;
for the histogram market the raw prediction), within the client's cap and
the context. Half of them finish under it if the model is right; their
lengths, finished or censored at the probe, are what the learner needs.

Probes are ordinary reservations: the ledger charges what they generate and
refunds the rest, so the budget invariant holds as for any request, and their
cost is counted apart (:class:`ExplorationBooks`) for the metrics. Two bounds
keep the cost small:

* ``share``: the chance that an insolvent request is probed, drawn from a
  hash of its request id (the same request is probed, or not, on every
  replica and on a retry);
* ``token_share``: probes hold at most this share of the tokens this market
  has allocated (probes included); until enough has been allocated, none.

A pool too empty for the probe abandons the request as it would have been.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from clear_core.errors import InvalidInputError

#: Default chance that a would-be-abandoned (insolvent) request is probed.
DEFAULT_EXPLORE_SHARE = 0.05
#: Default most share of the allocated tokens the probes may hold.
DEFAULT_EXPLORE_TOKEN_SHARE = 0.02


@dataclass(frozen=True)
class Exploration:
    """How many insolvent requests are probed, and how much of the budget they may take (module docstring)."""

    share: float = 0.0
    token_share: float = DEFAULT_EXPLORE_TOKEN_SHARE

    def __post_init__(self):
        for name in ("share", "token_share"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise InvalidInputError(f"exploration {name}", v, "must be in [0, 1]")

    @property
    def on(self) -> bool:
        return self.share > 0.0 and self.token_share > 0.0

    def draws(self, rid: str) -> bool:
        """Whether request ``rid`` is one of the probed share (a hash of the id: the same on every replica)."""
        if not self.on:
            return False
        h = int.from_bytes(hashlib.blake2b(str(rid).encode(), digest_size=8).digest(), "big")
        return h / 2.0 ** 64 < self.share

    @staticmethod
    def probe_cap(threshold_tokens: float, client_cap_tokens: int | None, context_limit_tokens: int | None) -> int:
        """The probe's cap before the pool check: the predicted threshold within the client's cap and the context."""
        cap = max(int(math.ceil(threshold_tokens)), 1)
        for bound in (client_cap_tokens, context_limit_tokens):
            if bound is not None:
                cap = min(cap, int(bound))
        return cap


class ExplorationBooks:
    """What a market allocated, and what of it went to probes (the cost of exploring)."""

    def __init__(self):
        self.allocated_tokens = 0  # every admitted cap, probes included
        self.probes = 0
        self.probe_allocated_tokens = 0
        self.probe_generated_tokens = 0
        self._open: set[str] = set()

    def affords(self, exploration: Exploration, cap: int) -> bool:
        """Whether a probe of ``cap`` tokens keeps the probes within ``exploration.token_share`` of allocation."""
        return self.probe_allocated_tokens + cap <= exploration.token_share * (self.allocated_tokens + cap)

    def admitted(self, rid: str, cap: int, probe: bool) -> None:
        self.allocated_tokens += int(cap)
        if probe:
            self.probes += 1
            self.probe_allocated_tokens += int(cap)
            self._open.add(rid)

    def settled(self, rid: str, generated: int) -> None:
        """A request ended (a probe's generated tokens are counted; a probe whose reservation expired or was
        recovered never settles here and stays out of ``probe_generated_tokens``)."""
        if rid in self._open:
            self._open.discard(rid)
            self.probe_generated_tokens += int(generated)

    def snapshot(self) -> dict:
        return {"probes": self.probes, "probe_allocated_tokens": self.probe_allocated_tokens,
                "probe_generated_tokens": self.probe_generated_tokens, "allocated_tokens": self.allocated_tokens}
