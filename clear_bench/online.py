"""``--protocol online``: every query of a stream served one at a time through the serving path.

The batch protocol (``single``) clears the whole stream at once with a budget
of ``b N``: a market that prices *expected* generated tokens then spends what
its model of the lengths says, and a model that is off by a few percent
over- or under-spends the stream by as much. A server does not work that way:
the allocator (:class:`clear_core.online_market.OnlineMarket`) prices each
arriving request against a window of recent demand, the ledger
(:class:`clear_core.ledger.TokenLedger`) reserves its cap, and the request is
settled with what it really generated, the rest refunded; the per-query
budget paces what is left of the block over the arrivals still to come, so a
stream that runs long raises the price for the rest of it.

Here the stream's queries arrive in order, one per tick, each with its own
prediction (and, for the policies that price one, its calibrated
distribution or calibration bin), against one budget block of ``b N``
(refunding for the policies that price generated tokens, the paper's cap
semantics for the others). A query generates ``min(recorded length, cap)``
and settles ``in_flight`` arrivals later (0: before the next one arrives),
whatever happens to the arrivals in between: requests end with time, not
with admissions, so a run of abandonments does not hold the caps in flight.
Its cap is what the market answered: the bench scores it like any other.
The baselines that need the true lengths (``oracle``, ``uniform-generated``)
are hindsight and stay batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from clear_core.budget import PerQueryBudget
from clear_core.ledger import TokenLedger
from clear_core.online_market import DEFAULT_WINDOW_SIZE, OnlineMarket
from clear_core.policies import Policy

#: Policies that need the true lengths: scored in batch under every protocol.
HINDSIGHT = ("oracle", "uniform-generated")
#: Uniform caps tried for the best uniform cap served through the ledger (geometric from b to the limit).
SERVED_UNIFORM_CAPS = 24


@dataclass(frozen=True)
class StreamInputs:
    """What the allocator is told about each query of a stream."""

    raw: np.ndarray  # the raw predicted thresholds
    sigma: float  # the predictor's one spread (for the paper's policies)
    median: np.ndarray  # calibrated medians, spreads and runaway shares (clear-cost)
    spread: np.ndarray
    runaway: np.ndarray
    histograms: tuple = ()  # the calibration's histograms and each query's bin (clear-cost-emp)
    bins: np.ndarray | None = None
    served: bool = False  # clear is told the calibrated median and spread, as serving tells it

    def at(self, i: int) -> tuple[float, float, float, float, int]:
        """(raw threshold, median, spread, runaway share, bin) of query ``i``."""
        return (float(self.raw[i]), float(self.median[i]), float(self.spread[i]), float(self.runaway[i]),
                -1 if self.bins is None else int(self.bins[i]))

    def observe(self, i: int, cap: int, generated: int, finished: bool) -> bool:
        """A settled query (these inputs are fixed: nothing changes)."""
        return False

    @staticmethod
    def concat(first: StreamInputs, second: StreamInputs) -> StreamInputs:
        """``first``'s queries then ``second``'s (one calibration: the same histograms)."""
        if first.histograms != second.histograms or first.served != second.served or first.sigma != second.sigma:
            raise ValueError("inputs of two calibrations cannot be served as one stream")
        cat = lambda a, b: None if a is None else np.concatenate([a, b])  # noqa: E731
        return StreamInputs(cat(first.raw, second.raw), first.sigma, cat(first.median, second.median),
                            cat(first.spread, second.spread), cat(first.runaway, second.runaway), first.histograms,
                            cat(first.bins, second.bins), first.served)


def stream_inputs(predictions, stream) -> StreamInputs:
    """What the online allocator is told about each query of ``stream`` under ``predictions``
    (a :class:`clear_bench.predictions.Predictions`)."""
    n = len(stream)
    median, spread, runaway = predictions.distribution(stream)
    lengths = predictions.empirical(stream)
    return StreamInputs(
        raw=predictions.thresholds(stream), sigma=float(predictions.sigma), median=np.asarray(median, dtype=float),
        spread=np.broadcast_to(np.asarray(spread, dtype=float), (n,)),
        runaway=np.broadcast_to(np.asarray(runaway, dtype=float), (n,)),
        histograms=() if lengths is None else tuple(lengths.histograms),
        bins=None if lengths is None else np.asarray(lengths.which), served=bool(predictions.as_served))


class _Tick:
    """The ledger's clock: one tick per arrival."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def serve_online(policy: Policy, inputs, tokens: np.ndarray, budget_per_query: int, *,
                 context_limit_tokens: float | None, in_flight: int = 0,
                 window_size: int = DEFAULT_WINDOW_SIZE, trace: list | None = None,
                 block_queries: int | None = None, learn_until: int = 0, exploration=None,
                 explored: dict | None = None) -> np.ndarray:
    """Each query's cap as the online market answered it (0: abandoned); module docstring.

    ``inputs``: a :class:`StreamInputs`, or a learner's view of the stream
    (:class:`clear_bench.learning.LearningInputs`): what each query is told
    when it arrives, and what it shows when it settles. A query that arrived
    before ``learn_until`` is shown to ``inputs`` when it settles (its cap,
    what it generated, whether it finished); a market that prices length
    histograms then prices with the ones ``inputs`` holds from the next
    arrival on; ``exploration`` (a :class:`clear_core.exploration.Exploration`)
    probes some of the insolvent ones among them, and ``explored`` receives
    what the probes cost (:class:`clear_core.exploration.ExplorationBooks`).
    ``block_queries``: arrivals per budget block (default: all of ``tokens``,
    one block).

    ``trace``: when given, one dict per arrival is appended to it, after its
    decision: the per-query budget it was priced with, its cap and reason, the
    ledger's reserved and spent tokens, and the median, spread and runaway
    share it was told.
    """
    n = len(tokens)
    clock = _Tick()
    refund = bool(policy.charges_generated_tokens)
    block = n if block_queries is None else int(block_queries)
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=budget_per_query, window_queries=block, refund_unused=refund),
                         clock)
    limit = None if context_limit_tokens is None else int(context_limit_tokens)
    emp = policy.prices_length_histograms
    market = OnlineMarket(policy, ledger, window_size=window_size, context_limit_tokens=limit,
                          lengths=inputs.histograms if emp else (), exploration=exploration if learn_until else None)
    caps = np.zeros(n, dtype=np.int64)
    running: deque = deque()

    def settle(j: int) -> None:
        used = int(min(tokens[j], caps[j]))
        market.settle(str(j), used)
        if j < learn_until and inputs.observe(j, int(caps[j]), used, bool(tokens[j] <= caps[j])) and emp:
            market.lengths = market.market.check_lengths(inputs.histograms)  # the same bins, refitted

    for i in range(n):
        clock.t = float(i)
        if i == learn_until:
            market.exploration = None  # learning is over: nothing more to probe for
        raw, median, spread, runaway, length_bin = inputs.at(i)
        if emp:
            d = market.request(str(i), raw, length_bin=length_bin)
        elif policy.charges_generated_tokens:
            d = market.request(str(i), median, log_sigma=spread, runaway=runaway)
        elif inputs.served:  # serving tells clear the calibrated median and spread
            d = market.request(str(i), median, log_sigma=spread)
        else:
            d = market.request(str(i), raw, log_sigma=float(inputs.sigma))
        if d.admitted:
            caps[i] = d.cap_tokens
            running.append(i)
        while running and running[0] <= i - in_flight:  # query j ends at arrival j + in_flight, served or not
            settle(running.popleft())
        if trace is not None:
            st = ledger.state()
            trace.append({"budget_per_query": float(d.budget_per_query_tokens), "cap": int(caps[i]),
                          "reason": d.reason.value, "reserved": int(st.reserved), "spent": int(st.spent),
                          "median": median, "spread": spread, "runaway": runaway})
    while running:
        settle(running.popleft())
    st = ledger.state()
    assert st.invariant_holds and st.reserved == 0, st  # the books close: every cap settled
    if explored is not None:
        explored.update(market.explored.snapshot())
    return caps


def serve_uniform(cap: int, tokens: np.ndarray, budget_per_query: int, *, in_flight: int) -> np.ndarray:
    """One uniform ``cap`` served through the same ledger as the markets (a block of ``b N``, unused caps
    refunded, each query ending ``in_flight`` arrivals after its own): a cap that does not fit what is
    left is cut to it, and a query finding the pool empty gets nothing. The caps it got."""
    n = len(tokens)
    clock = _Tick()
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=budget_per_query, window_queries=n, refund_unused=True),
                         clock)
    caps = np.zeros(n, dtype=np.int64)
    running: deque = deque()
    for i in range(n):
        clock.t = float(i)
        ledger.arrive()
        got = min(int(cap), ledger.available())
        if got > 0:
            ledger.reserve(str(i), got)
            caps[i] = got
            running.append(i)
        while running and running[0] <= i - in_flight:
            j = running.popleft()
            ledger.settle(str(j), int(min(tokens[j], caps[j])))
    while running:
        j = running.popleft()
        ledger.settle(str(j), int(min(tokens[j], caps[j])))
    return caps


def best_served_uniform(tokens: np.ndarray, correct: np.ndarray, budget_per_query: int, *, in_flight: int,
                        context_limit_tokens: float | None) -> tuple[int, float]:
    """(cap, accuracy) of the best uniform cap served by :func:`serve_uniform`, in hindsight: the cap that
    fills ``b N`` generated tokens and :data:`SERVED_UNIFORM_CAPS` caps from ``b`` to the context limit.
    With requests in flight this is the fair uniform baseline: it holds its caps in the ledger too."""
    from clear_core.simulate import solved_mask, uniform_cap_within

    limit = float(context_limit_tokens) if context_limit_tokens is not None else float(max(tokens.max(), 1))
    fill = uniform_cap_within(tokens, budget_per_query * len(tokens), context_limit_tokens)
    candidates = {int(fill), *np.unique(np.geomspace(budget_per_query, max(limit, budget_per_query),
                                                      SERVED_UNIFORM_CAPS).astype(int)).tolist()}
    best = (0, -1.0)
    for c in sorted(candidates):
        acc = float(solved_mask(serve_uniform(c, tokens, budget_per_query, in_flight=in_flight), tokens,
                                correct).mean())
        if acc > best[1]:
            best = (c, acc)
    return best
