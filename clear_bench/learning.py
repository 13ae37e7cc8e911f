"""Serving a stream while learning its lengths: the online market of :mod:`clear_bench.online` with the
length model refitted from what the served queries showed (:mod:`clear_core.length_learning`).

Each query is priced with the model as it stands when the query arrives: the
head's raw prediction from the query's encoder features, the calibration's
median, spread, runaway share and bin. When a query settles, the learner sees
what the service would: its features, its raw prediction, its cap, the tokens
it generated and whether it ended by itself (its recorded length fit the cap)
or at the cap. Every ``refit_every`` observations the head is refitted (a
censored ridge towards the prior head) and then the calibration, on the new
head's raw predictions, bin by bin on the prior's bins. An abandoned query is
never generated and is not observed.

``learn=False`` serves the same stream with the prior model throughout: the
model as shipped, the baseline the learner must beat.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from clear_core.calibration import Calibration
from clear_core.budget import PerQueryBudget
from clear_core.ledger import TokenLedger
from clear_core.length_learning import Observations, refit_calibration, refit_head
from clear_core.online_market import DEFAULT_WINDOW_SIZE, OnlineMarket
from clear_core.policies import Policy
from clear_bench.online import _Tick  # the ledger's clock: one tick per arrival

#: Raw predictions are held to these bounds, as the deployed predictor holds them (tokens).
MIN_RAW_TOKENS, MAX_RAW_TOKENS = 16.0, 8192.0


@dataclass
class LengthModel:
    """A head (weights on encoder features, log-tokens) and its calibration."""

    coef: np.ndarray
    intercept: float
    calibration: Calibration

    def raw(self, features: np.ndarray) -> np.ndarray:
        return np.clip(np.exp(features @ self.coef + self.intercept), MIN_RAW_TOKENS, MAX_RAW_TOKENS)


@dataclass
class TrafficLearner:
    """The length model of a served stream, refitted from the stream's censored observations."""

    prior: LengthModel
    features: np.ndarray  # (N, k): each query's encoder features
    alpha: float  # the head's ridge towards the prior weights (log-likelihood units)
    refit_every: int = 50
    prior_weight: float = 30.0
    learn: bool = True
    model: LengthModel = field(init=False)
    seen: list = field(default_factory=list)  # (query, cap, generated, finished)
    refits: int = 0

    def __post_init__(self):
        self.model = self.prior

    def inputs(self, i: int) -> tuple[float, float, float, float, int]:
        """(raw threshold, calibrated median, spread, runaway share, bin) of the query whose features are row
        ``i`` of ``features``, under the model now."""
        raw = float(self.model.raw(self.features[i][None, :])[0])
        median, sigma, runaway = self.model.calibration.apply([raw])
        return raw, float(median[0]), float(sigma[0]), float(runaway[0]), int(self.model.calibration.bin_of([raw])[0])

    def observe(self, i: int, cap: int, generated: int, finished: bool) -> bool:
        """Record a settled query; refit when due. True when the model changed."""
        self.seen.append((i, int(cap), int(generated), bool(finished)))
        if not self.learn or len(self.seen) % self.refit_every:
            return False
        self.refit()
        return True

    def refit(self) -> None:
        idx, caps, generated, finished = (np.array(col) for col in zip(*self.seen))
        x = self.features[idx]
        head = refit_head(x, generated, caps, finished, prior_coef=self.prior.coef,
                          prior_intercept=self.prior.intercept, alpha=self.alpha)
        raw = np.clip(np.exp(x @ head.coef + head.intercept), MIN_RAW_TOKENS, MAX_RAW_TOKENS)
        obs = Observations.of(raw, generated, caps, finished)
        calibration = refit_calibration(self.prior.calibration, obs, prior_weight=self.prior_weight)
        self.model = LengthModel(head.coef, head.intercept, calibration)
        self.refits += 1


def serve_learning(policy: Policy, learner: TrafficLearner, tokens: np.ndarray, budget_per_query: int, *,
                   context_limit_tokens: float | None, rows=None, in_flight: int = 0,
                   window_size: int = DEFAULT_WINDOW_SIZE) -> np.ndarray:
    """Each query's cap as the online market answered it while ``learner`` learned (0: abandoned).

    One block of ``budget_per_query * len(tokens)`` tokens, as :func:`clear_bench.online.serve_online`.
    Priced as the deployment prices: ``clear`` with the calibrated median and spread, ``clear-cost``
    with the runaway share too, ``clear-cost-emp`` with the raw prediction and its bin's histogram.
    ``rows``: each query's row of ``learner.features`` (default: the query's position), so one learner
    can serve several streams one after another and carry what it learned.
    """
    n = len(tokens)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=int)
    clock = _Tick()
    refund = bool(policy.charges_generated_tokens)
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=budget_per_query, window_queries=n, refund_unused=refund),
                         clock)
    limit = None if context_limit_tokens is None else int(context_limit_tokens)
    emp = policy.prices_length_histograms
    market = OnlineMarket(policy, ledger, window_size=window_size, context_limit_tokens=limit,
                          lengths=learner.model.calibration.histograms if emp else ())
    caps = np.zeros(n, dtype=np.int64)
    running: deque = deque()

    def settle(j: int) -> None:
        used = int(min(tokens[j], caps[j]))
        market.settle(str(j), used)
        if learner.observe(int(rows[j]), int(caps[j]), used, bool(tokens[j] <= caps[j])) and emp:
            market.lengths = market.market.check_lengths(learner.model.calibration.histograms)  # same bins, refitted

    for i in range(n):
        clock.t = float(i)
        raw, median, sigma, runaway, b = learner.inputs(int(rows[i]))
        if emp:
            d = market.request(str(i), raw, length_bin=b)
        elif policy.charges_generated_tokens:
            d = market.request(str(i), median, log_sigma=sigma, runaway=runaway)
        else:
            d = market.request(str(i), median, log_sigma=sigma)
        if d.admitted:
            caps[i] = d.cap_tokens
            running.append(i)
        while running and running[0] <= i - in_flight:
            settle(running.popleft())
    while running:
        settle(running.popleft())
    st = ledger.state()
    assert st.invariant_holds and st.reserved == 0, st
    return caps
