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

Observations are grouped by prompt (:func:`prompt_group`: a key from the
prompt's SHA-256). A service sees the same prompt again and again; a model
checked on repeats of the prompts it was fitted on is checked on what it
memorised, and one that memorised looks better than it is on the prompts it
has not seen. So the held-out observations are whole prompts
(:func:`held_out_groups`), the out-of-fold predictions a calibration is fitted
on come from folds of whole prompts, and the head's ridge strength is chosen
among :data:`ALPHA_MULTIPLES` of the given one by the held-out prompts'
censored likelihood (:func:`chosen_alpha`): strong where the traffic is like
what the head was fitted on, weak where it is not.

Only numpy and scipy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr

from clear_core.calibration import Calibration
from clear_core.censored import censored_log_likelihood
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
#: Multiples of the head's ridge strength a refit chooses among (:func:`chosen_alpha`).
ALPHA_MULTIPLES = (1.0, 4.0, 16.0, 64.0, 256.0)
#: How many standard errors a candidate's held-out gain must reach to replace a model (:func:`gain_z`).
PUBLISH_Z = 3.0
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
                 prior_weight: float = DEFAULT_PRIOR_WEIGHT, folds: int = DEFAULT_FOLDS,
                 groups=None) -> LengthModel:
        """The model refitted on observations (:mod:`clear_core.length_learning`), towards ``prior``: the
        head by a censored ridge of strength ``alpha`` on all of them; the calibration, with each prior bin
        worth ``prior_weight`` observations, on *out-of-fold* raw predictions (each observation predicted
        by the head fitted on the other ``folds - 1`` folds), as the shipped head's calibration was: a
        head's in-sample residuals are narrower than the ones it will make on new prompts, and a market
        told too narrow a spread spreads its caps too far. ``groups`` (:func:`prompt_group` of each
        observation's prompt) keep a prompt's observations in one fold; without them each observation is
        its own group. The version is this one's plus one."""
        x = np.atleast_2d(np.asarray(features, dtype=float))
        tokens, caps = np.asarray(tokens, dtype=float), np.asarray(caps, dtype=float)
        fin = np.asarray(finished, dtype=bool)
        fit = lambda m: refit_head(x[m], tokens[m], caps[m], fin[m], prior_coef=prior.coef,  # noqa: E731
                                   prior_intercept=prior.intercept, alpha=alpha)
        head = fit(np.ones(fin.size, dtype=bool))
        raw_log = np.empty(fin.size)
        keys = np.arange(fin.size, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        fold = _mixed(keys) % np.uint64(max(int(folds), 1))
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
                           {"observations": int(fin.size), "censored": int((~fin).sum()), "alpha": float(alpha)})

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


def log_likelihoods(model: LengthModel, features, tokens, caps, finished) -> np.ndarray:
    """Each observation's log-likelihood under ``model``'s served distribution: a finished request's length
    has density ``(1 - rho) * lognormal(median, sigma)``; a capped one exceeded its cap with probability
    ``rho + (1 - rho) * P(D > cap)``."""
    fin = np.asarray(finished, dtype=bool).ravel()
    if fin.size == 0:
        return np.zeros(0)
    median, sigma, runaway, _ = model.predict(features)
    rho = np.clip(runaway, 0.0, 0.999)
    seen = np.where(fin, np.maximum(np.asarray(tokens, dtype=float), 1.0), np.maximum(np.asarray(caps, dtype=float), 1.0))
    z = (np.log(seen) - np.log(median)) / sigma
    ll_fin = np.log1p(-rho) - 0.5 * z * z - np.log(sigma) - _HALF_LOG_2PI - np.log(seen)
    ll_cap = np.logaddexp(np.log(np.maximum(rho, 1e-300)), np.log1p(-rho) + log_ndtr(-z))
    return np.where(fin, ll_fin, ll_cap)


def held_out_log_likelihood(model: LengthModel, features, tokens, caps, finished) -> float:
    """Mean log-likelihood of observations under ``model``'s served distribution (:func:`log_likelihoods`).
    Higher is better; NaN with no observations."""
    ll = log_likelihoods(model, features, tokens, caps, finished)
    return float(np.mean(ll)) if ll.size else math.nan


def gain_z(better, worse, groups=None) -> float:
    """How sure a gain in mean log-likelihood is: the mean of ``better - worse`` (per observation) over its
    standard error, clustered by ``groups`` (the observations of one prompt are not independent: its
    repeats share the prompt's own length). +inf for a gain with no spread, 0 for none."""
    d = np.asarray(better, dtype=float) - np.asarray(worse, dtype=float)
    n = d.size
    if n == 0:
        return 0.0
    keys = np.arange(n) if groups is None else np.asarray(groups, dtype=np.int64)
    _, cluster = np.unique(keys, return_inverse=True)
    k = int(cluster.max()) + 1
    mean = float(d.mean())
    if k < 2:
        return 0.0
    per = np.bincount(cluster, weights=d - mean, minlength=k)  # each cluster's summed deviation
    se = math.sqrt(k / (k - 1) * float(per @ per)) / n
    if se == 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / se


@dataclass(frozen=True)
class RefitDecision:
    """What one validated refit decided (:func:`validated_refit`)."""

    outcome: str  # published | kept | rolled_back
    model: LengthModel  # the model in service after it
    heldout_log_likelihood: dict  # prior / current / candidate, per held-out observation
    alpha: float = math.nan  # the head's ridge strength the candidate was fitted with


def prompt_group(digest: str) -> int:
    """A prompt's group key: the first 63 bits of its hex SHA-256 (``hashlib.sha256(text).hexdigest()``)."""
    return int(str(digest)[:16], 16) >> 1


def prompt_group_of(text: str) -> int:
    """:func:`prompt_group` of a prompt's text (UTF-8)."""
    return prompt_group(hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest())


def _mixed(keys) -> np.ndarray:
    """Group keys scrambled (SplitMix64's finaliser): a fold or a holdout drawn from them is even even when
    the keys are small consecutive integers."""
    z = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def held_out_groups(groups, share: float) -> np.ndarray:
    """Which observations are held out: those whose group falls in the ``share`` of groups a hash of the key
    picks. The same prompt is always on the same side, in every refit and on every replica."""
    if not 0.0 < share < 1.0:
        raise InvalidInputError("holdout_share", share, "must be in (0, 1)")
    return (_mixed(groups) % np.uint64(1_000_000)).astype(np.int64) < int(round(share * 1_000_000))


def chosen_alpha(prior: LengthModel, train, held, *, alpha: float,
                 multiples=ALPHA_MULTIPLES) -> tuple[float, dict]:
    """The head's ridge strength among ``alpha`` times ``multiples``: the one whose censored fit on ``train``
    (features, tokens, caps, finished) gives ``held`` the highest mean Tobit log-likelihood (each fit scored
    with its own spread). Returns it and every candidate's score."""
    x, tokens, caps, fin = train
    hx, htokens, hcaps, hfin = held
    hfin = np.asarray(hfin, dtype=bool)
    hseen = np.where(hfin, np.maximum(np.asarray(htokens, dtype=float), 1.0), np.maximum(np.asarray(hcaps, dtype=float), 1.0))
    scores = {}
    for m in multiples:
        a = float(alpha) * float(m)
        fit = refit_head(x, tokens, caps, fin, prior_coef=prior.coef, prior_intercept=prior.intercept, alpha=a)
        scores[a] = float(np.mean(censored_log_likelihood(hx, np.log(hseen), ~hfin, fit.coef, fit.intercept,
                                                          fit.sigma)))
    best = max(scores, key=lambda a: (scores[a], a))  # a tie goes to the stronger pull towards the prior
    return best, scores


def validated_refit(current: LengthModel, prior: LengthModel, train, held, *, alpha: float,
                    prior_weight: float = DEFAULT_PRIOR_WEIGHT, train_groups=None, held_groups=None,
                    multiples=ALPHA_MULTIPLES, publish_z: float = PUBLISH_Z) -> RefitDecision:
    """One learning step with its check: the head's ridge strength chosen on ``held`` (:func:`chosen_alpha`,
    from ``alpha`` times ``multiples``), a candidate refitted on ``train`` (features, tokens, caps, finished;
    ``train_groups`` their prompt groups) towards ``prior`` with it, then the prior, ``current`` and the
    candidate scored on ``held`` (:func:`log_likelihoods`; ``held`` should be whole prompts the candidate was
    not fitted on, :func:`held_out_groups`, and ``held_groups`` their groups).

    The candidate is published when it describes the held-out prompts at least as well as the model in
    service and better than the prior by at least ``publish_z`` standard errors (:func:`gain_z`, clustered by
    prompt): the shipped model is not replaced on a difference the held-out prompts cannot tell from noise
    (on traffic like the one it was fitted on, a refit mostly fits noise), while a learned model gives way to
    one fitted on more of the traffic. When the prior beats the model in service by ``publish_z`` standard
    errors, the prior is published again (a rollback); otherwise ``current`` stays. A published model is
    ``current``'s version plus one."""
    chosen, _ = chosen_alpha(prior, train, held, alpha=alpha, multiples=multiples) if len(multiples) > 1 else (
        float(alpha) * float(multiples[0]), {})
    candidate = current.refitted(*train, prior=prior, alpha=chosen, prior_weight=prior_weight, groups=train_groups)
    ll = {name: log_likelihoods(m, *held) for name, m in (("prior", prior), ("current", current),
                                                          ("candidate", candidate))}
    score = {name: float(v.mean()) if v.size else math.nan for name, v in ll.items()}
    sure = lambda a, b: gain_z(ll[a], ll[b], held_groups) >= publish_z  # noqa: E731
    if score["candidate"] >= score["current"] and sure("candidate", "prior"):
        outcome, chosen_model = "published", candidate
    elif current.version > 0 and sure("prior", "current"):
        outcome, chosen_model = "rolled_back", prior
    else:
        return RefitDecision("kept", current, score, chosen)
    model = LengthModel(chosen_model.coef, chosen_model.intercept, chosen_model.calibration, current.version + 1,
                        {**chosen_model.meta,
                         **({"rolled_back_to": "the starting head"} if outcome == "rolled_back" else {}),
                         "heldout_log_likelihood": score})
    return RefitDecision(outcome, model, score, chosen)


def prior_alpha(ridge_alpha: float, residual_log_sd: float) -> float:
    """The shipped head's ridge penalty in the censored fit's units: a least-squares ridge ``alpha``
    on residuals of spread ``residual_log_sd`` weighs ``alpha / sd^2`` against the log-likelihood."""
    if not (ridge_alpha > 0 and residual_log_sd > 0):
        raise InvalidInputError("alpha", ridge_alpha, "ridge penalty and residual spread must be > 0")
    return float(ridge_alpha) / float(residual_log_sd) ** 2
