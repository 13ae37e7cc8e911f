"""What the global token budget is: the two budget modes as objects.

:class:`PerQueryBudget` (mode ``per_query``, the paper's setting: ``b`` tokens per query)
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
:class:`TokenBucketBudget` (mode ``rate``)
    The bucket starts full with ``burst_tokens`` and refills at
    ``tokens_per_s``; its content is the available budget *plus* the tokens
    reserved by in-flight requests, and never exceeds ``burst_tokens``
    (``available + reserved <= burst``: the burst is the most budget that can be
    committed at once). Unused tokens go back to the bucket when a request ends
    (``refund_unused=True`` by default); only generated tokens leave it.

Both say how budget flows in (:meth:`Budget.initial_grant`,
:meth:`Budget.grant_on_arrival`, :meth:`Budget.grant_on_refill`), how long a
shortfall takes to refill, and what per-query budget the online market clears
with (:meth:`Budget.pricing_budget_per_query`). The books themselves are
:class:`clear_core.ledger.TokenLedger`'s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

from clear_core.errors import InvalidInputError

#: Defaults, the one source for every layer (the serving config derives from these).
DEFAULT_TOKENS_PER_QUERY = 512.0
DEFAULT_WINDOW_QUERIES = 500
DEFAULT_RESERVATION_TTL_S = 600.0


def _check_tokens(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise InvalidInputError(name, value, "must be finite and >= 0")


@dataclass(frozen=True)
class Budget(ABC):
    """One budget mode. Frozen: a budget is configuration, the ledger holds the state."""

    refund_unused: bool  # unused parts of caps return to the pool when a request ends
    reservation_ttl_s: float  # unsettled reservations expire (charged in full) after this, s

    mode = "abstract"  # the name used in configs, snapshots and /v1/clear/status

    def __post_init__(self):
        if not (isinstance(self.reservation_ttl_s, (int, float)) and self.reservation_ttl_s > 0):
            raise InvalidInputError("reservation_ttl_s", self.reservation_ttl_s, "must be > 0")

    @abstractmethod
    def initial_grant(self) -> float:
        """Tokens in the pool before the first request."""

    @abstractmethod
    def grant_on_arrival(self, arrivals: int) -> float:
        """Tokens credited when arrival number ``arrivals`` (1-based) reaches the market."""

    @abstractmethod
    def grant_on_refill(self, level: float, elapsed_s: float) -> float:
        """Tokens credited after ``elapsed_s`` seconds with ``level = granted - spent`` in the pool."""

    @abstractmethod
    def seconds_until(self, shortfall_tokens: float, tokens: float) -> float:
        """How long until a shortfall of ``shortfall_tokens`` refills, for a request needing
        ``tokens`` (``inf`` if refill alone never covers it)."""

    @abstractmethod
    def pricing_budget_per_query(
        self,
        *,
        available: int,
        arrivals: int,
        recent_arrivals: int,
        recent_span_s: float,
        pace: bool,
        cap_cost_ratio: float,
    ) -> float:
        """The per-query budget ``b`` the online market clears its window with, in tokens.

        ``available`` is the pool now, ``arrivals`` the arrivals so far (this one
        included), ``recent_arrivals`` over ``recent_span_s`` seconds the recent
        arrival rate; ``pace`` asks per-query blocks to spread what is left;
        ``cap_cost_ratio`` is the recent tokens of cap per token charged (see
        :meth:`clear_core.online_market.OnlineMarket.cap_cost_ratio`).
        """

    def to_dict(self) -> dict:
        """JSON-able, with ``mode``; :func:`budget_from_dict` reads it back."""
        return {"mode": self.mode, **asdict(self)}


@dataclass(frozen=True)
class PerQueryBudget(Budget):
    """``tokens_per_query`` per arrival, credited per block of ``window_queries`` arrivals."""

    tokens_per_query: float = DEFAULT_TOKENS_PER_QUERY  # average budget b per query, tokens
    window_queries: int = DEFAULT_WINDOW_QUERIES  # arrivals per budget block (the budget window)
    refund_unused: bool = False  # the paper counts caps
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S

    mode = "per_query"

    def __post_init__(self):
        super().__post_init__()
        _check_tokens("tokens_per_query", self.tokens_per_query)
        if not (isinstance(self.window_queries, int) and self.window_queries >= 1):
            raise InvalidInputError("window_queries", self.window_queries, "must be an integer >= 1")

    def initial_grant(self) -> float:
        return 0.0

    def grant_on_arrival(self, arrivals: int) -> float:
        # arrivals <= 0: the arrival falls in the block a previous budget opened (TokenLedger.rebudget)
        w = self.window_queries
        return w * self.tokens_per_query if arrivals >= 1 and (arrivals - 1) % w == 0 else 0.0

    def grant_on_refill(self, level: float, elapsed_s: float) -> float:
        return 0.0

    def remaining_in_block(self, arrivals: int) -> int:
        """Arrivals still to come in the current block, the latest one included (``arrivals < 0``: ``-arrivals``
        more arrivals finish a block a previous budget opened, TokenLedger.rebudget)."""
        w = self.window_queries
        if arrivals < 0:
            return 1 - arrivals
        return w - (arrivals - 1) % w if arrivals else w

    def seconds_until(self, shortfall_tokens: float, tokens: float) -> float:
        return 0.0 if shortfall_tokens <= 0 else math.inf  # only new arrivals credit budget

    def pricing_budget_per_query(
        self, *, available, arrivals, recent_arrivals, recent_span_s, pace, cap_cost_ratio
    ) -> float:
        # Blocks are paced by what is left of them, which already counts what
        # requests really cost, so the cap / charge ratio is not applied here.
        if not pace:
            return float(self.tokens_per_query)
        # Pacing: what is left of the block per arrival still to come in it
        # (this one included), so over- or under-spending early in a block is
        # corrected smoothly instead of starving the block's last requests.
        return max(available, 0) / self.remaining_in_block(arrivals)


@dataclass(frozen=True)
class TokenBucketBudget(Budget):
    """A bucket of ``burst_tokens`` refilled at ``tokens_per_s``."""

    tokens_per_s: float = 0.0  # refill rate, tokens per second
    burst_tokens: float = 0.0  # capacity (and initial pool), tokens
    refund_unused: bool = True  # only generated tokens leave the bucket
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S

    mode = "rate"

    def __post_init__(self):
        super().__post_init__()
        _check_tokens("tokens_per_s", self.tokens_per_s)
        _check_tokens("burst_tokens", self.burst_tokens)
        if self.tokens_per_s <= 0 and self.burst_tokens <= 0:
            raise InvalidInputError("rate budget", (self.tokens_per_s, self.burst_tokens),
                                    "needs tokens_per_s > 0 or burst_tokens > 0")

    def initial_grant(self) -> float:
        return float(self.burst_tokens)

    def grant_on_arrival(self, arrivals: int) -> float:
        return 0.0

    def grant_on_refill(self, level: float, elapsed_s: float) -> float:
        # The bucket holds what is available *and* what is lent out to in-flight
        # requests (their reservations come back, in part, as refunds), so it
        # never holds more than its capacity: available + reserved <= burst.
        room = self.burst_tokens - level
        return min(self.tokens_per_s * max(elapsed_s, 0.0), room) if room > 0 else 0.0

    def seconds_until(self, shortfall_tokens: float, tokens: float) -> float:
        if shortfall_tokens <= 0:
            return 0.0
        if self.tokens_per_s > 0 and tokens <= self.burst_tokens:
            return shortfall_tokens / self.tokens_per_s
        return math.inf

    def pricing_budget_per_query(
        self, *, available, arrivals, recent_arrivals, recent_span_s, pace, cap_cost_ratio
    ) -> float:
        # What the refill rate buys per arrival at the recent arrival rate, in
        # caps: a cap costs only what it generates when unused tokens return.
        return self.tokens_per_s * recent_span_s / max(recent_arrivals, 1) * cap_cost_ratio


BUDGET_MODES = {cls.mode: cls for cls in (PerQueryBudget, TokenBucketBudget)}


def make_budget(mode: str = "per_query", *, refund_unused: bool | None = None, **fields) -> Budget:
    """Build a budget by mode name; ``refund_unused=None`` takes the mode's default."""
    try:
        cls = BUDGET_MODES[mode]
    except KeyError:
        raise InvalidInputError("budget mode", mode, f"expected one of {sorted(BUDGET_MODES)}") from None
    if refund_unused is not None:
        fields["refund_unused"] = bool(refund_unused)
    try:
        return cls(**fields)
    except TypeError as exc:  # a field of the other mode
        raise InvalidInputError(f"{mode} budget", sorted(fields), str(exc)) from None


def budget_from_dict(d: dict) -> Budget:
    """Inverse of :meth:`Budget.to_dict`."""
    d = dict(d)
    return make_budget(d.pop("mode"), **d)
