"""The length model a service prices with, as a value that can be refitted, versioned and published.

A model is a ridge head on frozen encoder features (``coef``, ``intercept``:
the raw predicted log length) and its calibration (:class:`Calibration`: the
median, spread, runaway share and length histogram of each bin of raw
prediction). :meth:`LengthModel.predict` is the one place where features
become what a market is told, the same in serving and in the bench:

* the raw prediction ``exp(x @ coef + intercept)`` (finite, at most
  ``2^20``), and the calibrated median, spread and runaway share of it;
* the median and the raw prediction held to
  [:data:`MIN_THRESHOLD_TOKENS`, :data:`MAX_THRESHOLD_TOKENS`].

:meth:`LengthModel.refitted` is one learning step on observed traffic
(:mod:`clear_core.length_learning`): the head first, then the calibration on
the new head's raw predictions. :func:`held_out_log_likelihood` scores a model
on observations it was not fitted on, censoring included: the test a
candidate must pass before it is published.

Only numpy and scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr

from clear_core.calibration import Calibration
from clear_core.errors import InvalidInputError
from clear_core.length_learning import DEFAULT_PRIOR_WEIGHT, Observations, refit_calibration, refit_head
from clear_core.traces import POOL_GENERATION_CAP_TOKENS

#: Bounds on a served threshold (median or raw prediction), tokens.
MIN_THRESHOLD_TOKENS = 16.0
MAX_THRESHOLD_TOKENS = float(POOL_GENERATION_CAP_TOKENS)
#: Bounds on the raw predicted log length before calibration (a non-finite one becomes the intercept).
MAX_LOG_TOKENS = math.log(2.0 ** 20)
#: Folds of the out-of-fold predictions a refit calibrates on (:meth:`LengthModel.refitted`).
DEFAULT_FOLDS = 5
#: Format tag of :meth:`LengthModel.as_dict`.
MODEL_FORMAT = "clear-length-model/1"
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class LengthModel:
    """A head and its calibration, with the version it was published as (0: as shipped)."""

    coef: np.ndarray  # (k,) weights on the encoder's features, log-tokens per feature unit
    intercept: float  # log-tokens
    calibration: Calibration
    version: int = 0
    meta: dict = field(default_factory=dict, compare=False)  # how it was fitted (observations, scores)

    def __post_init__(self):
        coef = np.asarray(self.coef, dtype=float).reshape(-1)
        if coef.size == 0 or not np.all(np.isfinite(coef)) or not math.isfinite(float(self.intercept)):
            raise InvalidInputError("length model", "weights", "needs finite weights and intercept")
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "intercept", float(self.intercept))

    def raw_log(self, features) -> np.ndarray:
        """The head's raw predicted log length of each row of ``features`` (finite, in [0, ln 2^20])."""
        x = np.atleast_2d(np.asarray(features, dtype=float))
        if x.shape[1] != self.coef.size:
            raise InvalidInputError("features", x.shape, f"the head has {self.coef.size} weights")
        pred = x @ self.coef + self.intercept
        return np.clip(np.where(np.isfinite(pred), pred, self.intercept), 0.0, MAX_LOG_TOKENS)

    def predict(self, features) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(median tokens, log spread, runaway share, raw prediction tokens) of each row, as served."""
        raw = np.exp(self.raw_log(features))
        median, sigma, runaway = self.calibration.apply(raw)
        return (np.clip(median, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS), np.asarray(sigma, dtype=float),
                np.asarray(runaway, dtype=float), np.clip(raw, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS))

    def refitted(self, features, tokens, caps, finished, *, prior: LengthModel, alpha: float,
                 prior_weight: float = DEFAULT_PRIOR_WEIGHT, folds: int = DEFAULT_FOLDS) -> LengthModel:
        """The model refitted on observations (:mod:`clear_core.length_learning`), towards ``prior``: the
        head by a censored ridge of strength ``alpha`` on all of them; the calibration, with each prior bin
        worth ``prior_weight`` observations, on *out-of-fold* raw predictions (each observation predicted
        by the head fitted on the other ``folds - 1`` folds), as the shipped head's calibration was: a
        head's in-sample residuals are narrower than the ones it will make on new prompts, and a market
        told too narrow a spread spreads its caps too far. The version is this one's plus one."""
        x = np.atleast_2d(np.asarray(features, dtype=float))
        tokens, caps = np.asarray(tokens, dtype=float), np.asarray(caps, dtype=float)
        fin = np.asarray(finished, dtype=bool)
        fit = lambda m: refit_head(x[m], tokens[m], caps[m], fin[m], prior_coef=prior.coef,  # noqa: E731
                                   prior_intercept=prior.intercept, alpha=alpha)
        head = fit(np.ones(fin.size, dtype=bool))
        raw_log = np.empty(fin.size)
        fold = np.arange(fin.size) % max(int(folds), 1)
        if folds > 1 and fin.size >= 2 * folds:
            for f in range(int(folds)):
                out = fit(fold != f)
                raw_log[fold == f] = LengthModel(out.coef, out.intercept, prior.calibration).raw_log(x[fold == f])
        else:
            raw_log = LengthModel(head.coef, head.intercept, prior.calibration).raw_log(x)
        raw = np.clip(np.exp(raw_log), MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS)
        calibration = refit_calibration(prior.calibration, Observations.of(raw, tokens, caps, fin),
                                        prior_weight=prior_weight)
        return LengthModel(head.coef, head.intercept, calibration, self.version + 1,
                           {"observations": int(fin.size), "censored": int((~fin).sum())})

    def as_dict(self) -> dict:
        return {"format": MODEL_FORMAT, "version": int(self.version), "coef": [float(v) for v in self.coef],
                "intercept": self.intercept, "calibration": self.calibration.as_dict(), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, doc: dict) -> LengthModel:
        if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
            raise InvalidInputError("length model", doc.get("format") if isinstance(doc, dict) else type(doc).__name__,
                                    f"expected format {MODEL_FORMAT!r}")
        return cls(np.asarray(doc["coef"], dtype=float), float(doc["intercept"]),
                   Calibration.from_dict(doc["calibration"]), int(doc.get("version", 0)), dict(doc.get("meta") or {}))


def held_out_log_likelihood(model: LengthModel, features, tokens, caps, finished) -> float:
    """Mean log-likelihood of observations under ``model``'s served distribution: a finished request's
    length has density ``(1 - rho) * lognormal(median, sigma)``; a capped one exceeded its cap with
    probability ``rho + (1 - rho) * P(D > cap)``. Higher is better; NaN with no observations."""
    fin = np.asarray(finished, dtype=bool).ravel()
    if fin.size == 0:
        return math.nan
    median, sigma, runaway, _ = model.predict(features)
    rho = np.clip(runaway, 0.0, 0.999)
    seen = np.where(fin, np.maximum(np.asarray(tokens, dtype=float), 1.0), np.maximum(np.asarray(caps, dtype=float), 1.0))
    z = (np.log(seen) - np.log(median)) / sigma
    ll_fin = np.log1p(-rho) - 0.5 * z * z - np.log(sigma) - _HALF_LOG_2PI - np.log(seen)
    ll_cap = np.logaddexp(np.log(np.maximum(rho, 1e-300)), np.log1p(-rho) + log_ndtr(-z))
    return float(np.mean(np.where(fin, ll_fin, ll_cap)))


@dataclass(frozen=True)
class RefitDecision:
    """What one validated refit decided (:func:`validated_refit`)."""

    outcome: str  # published | kept | rolled_back
    model: LengthModel  # the model in service after it
    heldout_log_likelihood: dict  # prior / current / candidate, per held-out observation


def validated_refit(current: LengthModel, prior: LengthModel, train, held, *, alpha: float,
                    prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> RefitDecision:
    """One learning step with its check: a candidate refitted on ``train`` (features, tokens, caps, finished)
    towards ``prior``, then the prior, ``current`` and the candidate scored on ``held``
    (:func:`held_out_log_likelihood`). The candidate is published when it scores at least as well as both;
    when the prior beats both, the prior is published again (a rollback); otherwise ``current`` stays. A
    published model is ``current``'s version plus one."""
    candidate = current.refitted(*train, prior=prior, alpha=alpha, prior_weight=prior_weight)
    score = {name: held_out_log_likelihood(m, *held)
             for name, m in (("prior", prior), ("current", current), ("candidate", candidate))}
    if score["candidate"] >= score["current"] and score["candidate"] >= score["prior"]:
        outcome, chosen = "published", candidate
    elif score["prior"] > score["current"] and current.version > 0:
        outcome, chosen = "rolled_back", prior
    else:
        return RefitDecision("kept", current, score)
    model = LengthModel(chosen.coef, chosen.intercept, chosen.calibration, current.version + 1,
                        {**chosen.meta, **({"rolled_back_to": "the starting head"} if outcome == "rolled_back" else {}),
                         "heldout_log_likelihood": score})
    return RefitDecision(outcome, model, score)


def prior_alpha(ridge_alpha: float, residual_log_sd: float) -> float:
    """The shipped head's ridge penalty in the censored fit's units: a least-squares ridge ``alpha``
    on residuals of spread ``residual_log_sd`` weighs ``alpha / sd^2`` against the log-likelihood."""
    if not (ridge_alpha > 0 and residual_log_sd > 0):
        raise InvalidInputError("alpha", ridge_alpha, "ridge penalty and residual spread must be > 0")
    return float(ridge_alpha) / float(residual_log_sd) ** 2
