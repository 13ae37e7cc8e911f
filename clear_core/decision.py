"""What a market decides for one request, and why: a cap that fits the pool, or an abandonment.

The allocator (:class:`~clear_core.online_market.OnlineMarket`) and an ingress
replica (:class:`~clear_core.lease.IngressMarket`) decide in the same words: a
:class:`Decision` whose :class:`DecisionReason` says why.

Solvency against the real pool
------------------------------
The market's cap is checked against what can be reserved (the ledger's pool,
or a replica's lease): if it does not fit, it is cut to what is available
when that still reaches the request's predicted threshold
(``CUT_TO_AVAILABLE``), and the request is abandoned otherwise
(``POOL_EMPTY``; :func:`fit_to_pool`). A request whose market cap is 0 is
insolvent at the shadow price (``INSOLVENT``): an operator acts differently on
the two abandonments (the first says the price is high, the second that the
pool is drained).

Groups and floors
-----------------
One decision may cover a *group*: the ``n`` choices of one request, priced as
one market entry the way the best-of-k market prices ``k`` trajectories of one
problem (its threshold is ``n`` times one choice's, its cap is the group's
total, each choice gets an ``n``-th). The reserved cap is then a multiple of
the group's size (:func:`usable_cap`), so every reserved token can be
generated. A request may also need a *floor*: a cap below it buys nothing (a
structured answer cut before its JSON closes, a reasoning request without room
for its answer), so a market cap below the floor is ``INSOLVENT`` and a pool
that cannot cover the floor is ``POOL_EMPTY``.

Retries
-------
An abandonment says when a retry could succeed and whether to retry at all
(:attr:`Decision.should_retry`, :func:`retry_advice`): a request insolvent at
the shadow price stays insolvent until the demand the price was cleared
against has turned over (about ``window / arrival rate``), so it is told not to
retry soon; a solvent request refused by an empty pool is told to come back
after the refill time when a refill will cover it. (How a retry is told from
new demand: :mod:`clear_core.demand`.)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from clear_core.tenants import DEFAULT_TENANT

#: Abandoned requests are retried after at least this long, and are told at most this long (HTTP Retry-After).
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 3600.0


class DecisionReason(str, enum.Enum):
    """Why the market decided what it did; the values are stable (metric labels, error bodies)."""

    ADMITTED = "admitted"  # the market's cap fits the pool
    CUT_TO_AVAILABLE = "cut_to_available"  # admitted with the pool's remainder (still >= the threshold)
    INSOLVENT = "insolvent"  # abandoned: cannot pay back its cost at the shadow price
    POOL_EMPTY = "pool_empty"  # abandoned: solvent, but the pool cannot cover its threshold
    EXPLORED = "explored"  # insolvent, admitted at a probe cap so the learner sees it (clear_core.exploration)

    @property
    def admitted(self) -> bool:
        return self in (DecisionReason.ADMITTED, DecisionReason.CUT_TO_AVAILABLE, DecisionReason.EXPLORED)


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
    reservation_price: float = 0.0  # price of a token held reserved (0: the open caps fit; clear_core.in_flight)

    @property
    def admitted(self) -> bool:
        return self.reason.admitted


def usable_cap(cap: int, group: int = 1, floor_tokens: int = 1) -> int:
    """The part of ``cap`` a group of ``group`` choices can use (a multiple of ``group``), or 0 when that is
    below ``floor_tokens`` (module docstring, "Groups and floors")."""
    group = max(int(group), 1)
    cap = int(cap) - int(cap) % group
    return cap if cap >= max(int(floor_tokens), group) else 0


def probe_cap(exploration, books, rid: str, threshold_tokens: float, client_cap_tokens: int | None,
              context_limit_tokens: int | None, available: int, group: int = 1, floor_tokens: int = 1) -> int:
    """The cap an insolvent request is probed at (:mod:`clear_core.exploration`), or 0: not drawn, over the
    probes' token share, below its floor, or more than the ``available`` pool."""
    if exploration is None or not exploration.draws(rid):
        return 0
    cap = usable_cap(exploration.probe_cap(threshold_tokens, client_cap_tokens, context_limit_tokens), group,
                     floor_tokens)
    if cap <= 0 or cap > available or not books.affords(exploration, cap):
        return 0
    return cap


def fit_to_pool(cap: int, available: int, threshold_tokens: float, group: int = 1,
                floor_tokens: int = 1) -> tuple[DecisionReason, int]:
    """The cap a request reserves out of ``available`` tokens (module docstring, "Solvency against the real
    pool"): its own when it fits, else what is available when that still reaches the predicted threshold
    (the median of the true length under the predictor's error, so a cut cap is still worth serving) and
    the request's floor; ``(POOL_EMPTY, 0)`` otherwise. Caps are kept usable by a group of ``group``."""
    if cap <= available:
        return DecisionReason.ADMITTED, cap
    cut = usable_cap(available, group, floor_tokens)
    if cut and cut >= max(math.ceil(threshold_tokens), 1):
        return DecisionReason.CUT_TO_AVAILABLE, cut
    return DecisionReason.POOL_EMPTY, 0


def retry_advice(reason: DecisionReason, turnover_s: float, refill_s: float) -> tuple[float, bool]:
    """(Retry-After, should retry) of an abandonment: insolvent waits for the demand to turn over
    and is told not to retry soon; a solvent request refused by an empty pool waits for the refill."""
    if reason is DecisionReason.INSOLVENT:
        wait, should = turnover_s, False
    else:
        wait = refill_s
        should = math.isfinite(wait)
    retry = MAX_RETRY_AFTER_S if not math.isfinite(wait) else min(max(MIN_RETRY_AFTER_S, wait), MAX_RETRY_AFTER_S)
    return float(retry), should


def abandonment(reason: DecisionReason, quote: dict, turnover_s: float, refill_s: float) -> Decision:
    """The decision that abandons a request priced at ``quote`` (the other fields of its Decision), with
    its retry advice."""
    retry, should = retry_advice(reason, turnover_s, refill_s)
    return Decision(reason=reason, cap_tokens=0, retry_after_s=retry, should_retry=should, **quote)
