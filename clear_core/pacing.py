"""Pacing: the per-query budget ``b`` the online market clears its window with, and the end of a block.

The per-query budget
--------------------
The window market (:mod:`clear_core.demand`) clears ``window + [new request]``
with budget ``b * (len(window) + 1)``. ``b`` is the budget's
(:meth:`clear_core.budget.Budget.pricing_budget_per_query`): a per-query
budget's ``b``, paced over its block (what is left of the block spread over
the arrivals still to come), or what a token bucket's refill rate buys at the
recent arrival rate, ``b = tokens_per_s * span / n`` over the window's
arrivals (``span`` floored at ``min_rate_span_s``).

``clear-cost`` clears a budget of *expected generated tokens*, so the window
market uses ``b`` as it is; the paper's cap policies clear caps, and in a
refunding budget ``b`` is scaled by the measured cap / charge ratio
(:meth:`Pacing.cap_cost_ratio`). Either way the ledger reserves whole caps:
reservation = cap, price = expected cost, so the invariant
``reserved + spent <= granted`` is untouched.

Pacing counts the caps in flight as spent. Counting them at the tokens they
are expected to generate instead (they mostly come back) spends a little
more of a block when requests arrive at their own pace, but with
closed-loop clients it fails: the first burst is priced as if the refunds
were already back, takes the whole block in a few dozen caps, and every
request that arrives while they run is abandoned at once, so the clients
burn through their queries (docs/design-notes.md, "Pacing and the end of a
block"). What the caps in flight cost is priced instead by a second budget
(:mod:`clear_core.in_flight`).

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
``available - share * (arrivals still to come) * b`` (:meth:`Pacing.block_bound`);
a request whose market cap is larger gets its best response at the
clearing's prices among the caps within that bound
(:func:`clear_core.empirical_market.caps_at_log_price_empirical` with the
bound as its context limit), or is abandoned as insolvent when no cap within
it is worth its price. Well inside a block the bound is about half the pool
and never binds. It applies to the markets that price length histograms
(``clear-cost-emp``, the serving default; the others keep their cap), and not
to a token bucket, which refills instead of ending. It is the allocator's
rule for its own decisions: with ``decisions: ingress`` the replicas price
from quotes against their leases (:mod:`clear_core.lease`), and a lease is at
most a quarter of what is left of the pool.
"""

from __future__ import annotations

from collections import deque

from clear_core.budget import Budget, PerQueryBudget
from clear_core.errors import InvalidInputError
from clear_core.ledger import Settlement, TokenLedger

#: Floor of the arrival span used to estimate the arrival rate of a token bucket.
DEFAULT_MIN_RATE_SPAN_S = 1.0
#: Refunds to the pool: settlements over which the cap / charge ratio is measured,
#: how many are needed before it is used, and its ceiling.
COST_WINDOW = 256
MIN_COST_SAMPLES = 20
MAX_CAP_COST_RATIO = 8.0
#: At the end of a per-query block, each later arrival keeps at least this share of the paced budget
#: (module docstring, "The end of a block"); chosen on the bench's served streams (docs/design-notes.md,
#: "Pacing and the end of a block", and the results it links to).
BLOCK_RESERVE_SHARE = 0.5


class Pacing:
    """The per-query budget of the window market, from the ledger and the recent arrivals and settlements.

    ``window_size``: arrivals the arrival rate is measured over (the pricing
    window's). ``pace``: a per-query budget clears with the block's remaining
    budget per remaining arrival. ``block_reserve``: share of the paced budget
    each later arrival of a block keeps (0: off). ``charges_generated_tokens``:
    the market's budget already is one of expected generated tokens (no cap /
    charge ratio).
    """

    def __init__(self, ledger: TokenLedger, *, window_size: int, min_rate_span_s: float = DEFAULT_MIN_RATE_SPAN_S,
                 pace: bool = True, block_reserve: float = BLOCK_RESERVE_SHARE,
                 charges_generated_tokens: bool = False):
        if not (isinstance(block_reserve, (int, float)) and 0 <= block_reserve <= 1):
            raise InvalidInputError("block_reserve", block_reserve, "must be in [0, 1]")
        self.ledger = ledger
        self.min_rate_span_s = min_rate_span_s
        self.pace = pace
        self.block_reserve = block_reserve
        self.charges_generated_tokens = bool(charges_generated_tokens)
        self.times: deque = deque(maxlen=max(window_size, 1))  # clock times of the recent new arrivals
        self.costs: deque = deque(maxlen=COST_WINDOW)  # (cap, charged) of the recent settlements

    @property
    def budget(self) -> Budget:
        return self.ledger.budget

    def arrived(self, now: float) -> None:
        """A new arrival (not a retry) at ``now``."""
        self.times.append(now)

    def settled(self, settlement: Settlement) -> None:
        """A request ended normally (a failed one says nothing about what a cap costs)."""
        self.costs.append((settlement.cap, settlement.charged))

    def arrival_rate(self, now: float) -> float:
        """Recent arrivals per second (over the window's arrival times)."""
        n = len(self.times)
        if n == 0:
            return 0.0
        return n / max(now - self.times[0], self.min_rate_span_s)

    def budget_per_query(self, now: float, *, cap_cost_ratio: float, ahead: bool = False) -> float:
        """b (the budget's :meth:`~clear_core.budget.Budget.pricing_budget_per_query`) at ``cap_cost_ratio``.

        ``ahead``: for the next arrival, not yet counted (a quote prices requests still to come; the
        budget block that arrival would open is counted in).
        """
        n = len(self.times)
        span = max(now - self.times[0], self.min_rate_span_s) if n else self.min_rate_span_s
        arrivals = self.ledger.budget_arrivals + int(ahead)
        opens = self.budget.grant_on_arrival(arrivals) if ahead else 0.0
        return self.budget.pricing_budget_per_query(
            available=self.ledger.pricing_available(now) + opens, arrivals=arrivals,
            recent_arrivals=n, recent_span_s=span, pace=self.pace, cap_cost_ratio=cap_cost_ratio,
        )

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
        if self.charges_generated_tokens:  # its budget already is one of expected generated tokens
            return 1.0
        if not self.budget.refund_unused or len(self.costs) < MIN_COST_SAMPLES:
            return 1.0
        caps = sum(c for c, _ in self.costs)
        charged = sum(g for _, g in self.costs)
        return float(min(max(caps / max(charged, 1), 1.0), MAX_CAP_COST_RATIO))

    def block_bound(self, b: float, now: float) -> float | None:
        """The most one cap may hold near the end of a per-query block: the pool less ``block_reserve``
        times the paced budget ``b`` for each later arrival of the block; None where it does not apply
        (module docstring, "The end of a block")."""
        budget = self.budget
        if not (self.block_reserve > 0 and self.pace and isinstance(budget, PerQueryBudget)):
            return None
        later = budget.remaining_in_block(self.ledger.budget_arrivals) - 1
        return float(self.ledger.available(now) - self.block_reserve * later * b)
