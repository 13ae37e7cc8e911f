"""Serving a stream while learning its lengths (``clear-llm bench --learn``).

The online market of :mod:`clear_bench.online` told, for each query, what the
length model says *now* (:class:`LearningInputs`): the raw prediction of the
query's encoder features, the calibrated median, spread, runaway share and
bin (:meth:`clear_core.length_model.LengthModel.predict`, as serving tells
it). When a query settles the learner sees what the service would: its
features, its cap, the tokens it generated and whether it ended by itself (its
recorded length fit the cap) or at the cap. Every ``refit_every``
observations a candidate is refitted towards the prior (the head as given)
on all it has seen of 80% of the prompts, and checked on the other 20%
(whole prompts, drawn by a hash of the prompt's SHA-256 as in serving): its
ridge strength is chosen on them, and it replaces the model only when it
describes them at least as well as the model, and better than the prior by
at least three standard errors
(:func:`clear_core.length_model.validated_refit`, the step the serving
learner takes). An abandoned query is never generated and is not observed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from clear_core.calibration import quantile_coverage, quantile_coverage_error
from clear_core.length_learning import DEFAULT_PRIOR_WEIGHT
from clear_core.length_model import LengthModel, held_out_groups, validated_refit

#: Settled queries between refits (the serving learner's default, ``learner.refit_every``).
DEFAULT_REFIT_EVERY = 50
#: Warm-up arrivals per point of the warm-up curve.
CURVE_STEP = 250


@dataclass
class LearningInputs:
    """What each query of a stream is told, from a length model refitted on what the stream showed."""

    prior: LengthModel
    features: np.ndarray  # (n, k): each query's encoder features, in arrival order
    groups: np.ndarray  # (n,): each query's prompt group (clear_core.length_model.prompt_group_of its prompt)
    alpha: float  # the head's ridge towards the prior weights (log-likelihood units)
    refit_every: int = DEFAULT_REFIT_EVERY
    prior_weight: float = DEFAULT_PRIOR_WEIGHT
    holdout_share: float = 0.2  # the share of prompts held out to check a candidate (as serving)
    model: LengthModel = field(init=False)
    seen: list = field(default_factory=list)  # (query, cap, generated, finished)
    sigma: float = field(init=False)
    served: bool = True
    _told: dict = field(default_factory=dict)  # model version -> (median, spread, runaway, raw) of every query

    def __post_init__(self):
        self.model = self.prior
        self.sigma = float(np.median(self.prior.calibration.log_sigma))

    @property
    def histograms(self) -> tuple:
        return tuple(self.model.calibration.histograms)

    def _predicted(self) -> tuple[np.ndarray, ...]:
        if self.model.version not in self._told:
            self._told = {self.model.version: self.model.predict(self.features)}
        return self._told[self.model.version]

    def at(self, i: int) -> tuple[float, float, float, float, int]:
        median, spread, runaway, raw = (float(a[i]) for a in self._predicted())
        return raw, median, spread, runaway, int(self.model.calibration.bin_of([raw])[0])

    def observe(self, i: int, cap: int, generated: int, finished: bool) -> bool:
        """Record a settled query; refit when due. True when the model changed."""
        self.seen.append((i, int(cap), int(generated), bool(finished)))
        if len(self.seen) % self.refit_every:
            return False
        idx, caps, generated, fin = (np.array(col) for col in zip(*self.seen))
        held = held_out_groups(self.groups[idx], self.holdout_share)
        if held.all() or not held.any():
            return False
        part = lambda m: (self.features[idx[m]], generated[m], caps[m], fin[m])  # noqa: E731
        with threadpool_limits(1):  # a 384-wide fit: BLAS threads only contend (10x slower on a busy machine)
            decision = validated_refit(self.model, self.prior, part(~held), part(held), alpha=self.alpha,
                                       prior_weight=self.prior_weight, train_groups=self.groups[idx[~held]],
                                       held_groups=self.groups[idx[held]])
        changed = decision.model is not self.model
        self.model = decision.model
        return changed


def warmup_curve(trace: list[dict], tokens: np.ndarray, correct: np.ndarray, warmup: int,
                 step: int = CURVE_STEP) -> list[dict]:
    """Per ``step`` warm-up arrivals: the share solved (percent) and the calibration error of what the
    queries were told (:func:`clear_core.calibration.quantile_coverage_error` of their medians, spreads
    and runaway shares against their recorded lengths)."""
    out = []
    for lo in range(0, warmup, step):
        hi = min(lo + step, warmup)
        rows = trace[lo:hi]
        caps = np.array([r["cap"] for r in rows])
        t = np.asarray(tokens[lo:hi])
        solved = (caps > 0) & (caps >= t) & np.asarray(correct[lo:hi], dtype=bool)
        err = quantile_coverage_error(quantile_coverage(t, [r["median"] for r in rows], [r["spread"] for r in rows],
                                                        [r["runaway"] for r in rows]))
        out.append({"arrivals": hi, "accuracy": 100.0 * float(solved.mean()), "calibration_error": err})
    return out
