"""Learning the length model from the service's own, censored observations.

What the service sees of an admitted request: its features (what the head
reads), its raw prediction, its cap, the tokens it generated, and whether it
ended by itself (its length observed) or at its cap (only a lower bound:
:mod:`clear_core.censored`). From these the learner refits, with the shipped
model as its prior:

* **the head** (:func:`refit_head`): the ridge weights on frozen features, a
  censored (Tobit) fit pulled towards the shipped weights;
* **the calibration** (:func:`refit_calibration`), bin by bin on the prior's
  bins (their centres are kept, so a bin index means the same bin to every
  market that prices it):

  - the bias and spread of ``ln d - ln tau_hat``: a censored normal fit, the
    prior bin worth ``prior_weight`` observations;
  - the runaway share (a request that never finishes): a mixture-cure model
    fitted by EM. A finished request is not a runaway; a capped one is a
    runaway, or a finite length above its cap, in the proportion the fitted
    log-normal gives its cap (caps near the context limit tell the two apart
    best, small caps only through the log-normal's tail);
  - the length histogram the empirical market prices: the product-limit
    estimate (Kaplan-Meier) of the residual's distribution where finished
    observations reach, the prior bin's shape beyond the last one, the
    runaway mass on top, mixed with the prior histogram by the same weight.
    The service never sees whether an answer was right, so each cell keeps
    the prior's share of correct answers.

An abandoned request is never generated and says nothing: the hard prompts
the market abandons stay at what the prior says about them unless some are
admitted to be seen (exploration, in the serving layer).

Only numpy and scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from clear_core.calibration import MIN_LOG_SIGMA, Calibration
from clear_core.censored import CensoredFit, fit_censored_ridge, kaplan_meier
from clear_core.empirical_market import LOG_RATIO_GRID, LengthHistogram
from clear_core.errors import InvalidInputError

#: How many observations the prior bin is worth (its bias, spread, runaway share and histogram).
DEFAULT_PRIOR_WEIGHT = 30.0
#: Most EM rounds of the runaway share and the censored normal (each is a pass over the bin's residuals).
CURE_ROUNDS = 400
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Observations:
    """What the service saw of settled requests, one row each."""

    raw_tokens: np.ndarray  # the head's raw prediction (tokens) the request was priced with
    tokens: np.ndarray  # tokens generated
    caps: np.ndarray  # the cap it ran under
    finished: np.ndarray  # ended by itself (its length is ``tokens``); else stopped at its cap

    @classmethod
    def of(cls, raw_tokens, tokens, caps, finished) -> Observations:
        obs = cls(*(np.asarray(a, dtype=float).ravel() for a in (raw_tokens, tokens, caps)),
                  np.asarray(finished, dtype=bool).ravel())
        n = obs.tokens.size
        if not (obs.raw_tokens.size == obs.caps.size == obs.finished.size == n):
            raise InvalidInputError("observations", n, "raw predictions, tokens, caps and flags must match")
        if n and (np.any(obs.raw_tokens <= 0) or np.any(obs.caps < 1) or np.any(obs.tokens < 0)
                  or not np.all(np.isfinite(obs.tokens))):
            raise InvalidInputError("observations", "values", "predictions > 0, caps >= 1, tokens >= 0, finite")
        return obs

    @property
    def log_residual(self) -> np.ndarray:
        """``ln(d / tau_hat)`` of a finished request, ``ln(cap / tau_hat)`` (a lower bound) of a capped one."""
        seen = np.where(self.finished, np.maximum(self.tokens, 1.0), self.caps)
        return np.log(seen) - np.log(self.raw_tokens)


def refit_head(features, tokens, caps, finished, *, prior_coef, prior_intercept: float, alpha: float) -> CensoredFit:
    """The head refitted on observed traffic: a Tobit fit of log length on ``features``, pulled towards the
    shipped ``(prior_coef, prior_intercept)`` by the ridge ``alpha`` (:func:`clear_core.censored.fit_censored_ridge`)."""
    fin = np.asarray(finished, dtype=bool)
    seen = np.where(fin, np.maximum(np.asarray(tokens, dtype=float), 1.0), np.asarray(caps, dtype=float))
    return fit_censored_ridge(features, np.log(seen), ~fin, prior_coef=prior_coef, prior_intercept=prior_intercept,
                              alpha=alpha)


def _cure_fit(r, cens, prior_mu, prior_sigma, prior_runaway, weight):
    """Bias, spread and runaway share of one bin's residuals ``r`` (censored where ``cens``), by EM; and each
    observation's posterior chance of being a runaway (0 for a finished one).

    Each round: a capped residual is a runaway with the posterior chance ``post``; else a normal residual
    above its cap, whose expected value and square the truncated normal gives (inverse Mills ratio). The
    bias and the runaway share are the weighted means of those, the prior worth ``weight`` observations;
    the spread is the finished residuals' and the capped ones' expected squares, shrunk as the bias."""
    r = np.asarray(r, dtype=float)
    rho = float(prior_runaway)
    mu, sigma = float(prior_mu), float(prior_sigma)
    post = np.zeros(r.size)
    n_fin = float((~cens).sum())
    for _ in range(CURE_ROUNDS):
        z = (r - mu) / sigma
        log_surv = log_ndtr(-z)
        surv = np.exp(log_surv)
        denom = rho + (1.0 - rho) * surv
        post = np.where(cens & (denom > 0), rho / np.where(denom > 0, denom, 1.0), 0.0)
        mills = np.where(cens, np.exp(-0.5 * z * z - _HALF_LOG_2PI - log_surv), 0.0)  # phi(z) / (1 - Phi(z))
        w = 1.0 - post  # a probable runaway says little about the finite lengths
        ey = np.where(cens, mu + sigma * mills, r)
        eyy = np.where(cens, sigma * sigma * (1.0 + z * mills), (r - mu) ** 2)  # E[(y - mu)^2]
        new_mu = (float(w @ ey) + weight * prior_mu) / (float(w.sum()) + weight)
        shift = new_mu - mu  # E[(y - new_mu)^2] from the moments about mu
        var = float(w @ (eyy - 2.0 * shift * (ey - mu))) / max(float(w.sum()), 1e-12) + shift * shift
        fit_sigma = math.sqrt(max(var, MIN_LOG_SIGMA ** 2))
        new_sigma = max((n_fin * fit_sigma + weight * prior_sigma) / (n_fin + weight), MIN_LOG_SIGMA)
        new_rho = (weight * prior_runaway + post.sum()) / (weight + r.size)
        done = abs(new_rho - rho) < 1e-7 and abs(new_mu - mu) < 1e-7 and abs(new_sigma - sigma) < 1e-7
        rho, mu, sigma = float(new_rho), float(new_mu), float(new_sigma)
        if done:
            break
    return mu, sigma, rho, post


def _histogram(prior: LengthHistogram, r, cens, post, rho, share_prior) -> LengthHistogram:
    """A bin's histogram: Kaplan-Meier where finished residuals reach, the prior's shape beyond, mixed."""
    finite = post < 0.5  # capped requests more likely runaways leave the finite-length estimate
    times, surv = kaplan_meier(r[finite], cens[finite])
    grid = LOG_RATIO_GRID
    prior_fin = np.asarray(prior.correct) + np.asarray(prior.wrong)
    ok_share = np.divide(np.asarray(prior.correct), prior_fin, out=np.full(grid.size, 0.8), where=prior_fin > 0)
    mass = np.zeros(grid.size)
    if times.size:
        steps = -np.diff(np.concatenate([[1.0], surv]))
        cells = np.minimum(np.searchsorted(grid, times, side="left"), grid.size - 1)
        np.add.at(mass, cells, steps)
        left = float(surv[-1])
        beyond = np.arange(grid.size) > cells.max()
    else:
        left, beyond = 1.0, np.ones(grid.size, dtype=bool)
    tail = prior_fin * beyond
    mass *= 1.0 - rho  # the finite lengths' share; runaways on top
    if tail.sum() > 0:
        mass += (1.0 - rho) * left * tail / tail.sum()
        runaway = rho
    else:  # nothing of the prior lies beyond: the unseen mass is never finished, as far as anyone knows
        runaway = rho + (1.0 - rho) * left
    own = LengthHistogram(tuple(mass * ok_share), tuple(mass * (1.0 - ok_share)), float(runaway))
    return own.mixed(prior, share_prior)


def refit_calibration(prior: Calibration, obs: Observations, *,
                      prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> Calibration:
    """The calibration refitted on observed traffic, bin by bin on ``prior``'s bins (module docstring).

    ``prior_weight``: how many observations each prior bin is worth.
    """
    if not isinstance(prior, Calibration):
        raise InvalidInputError("prior", type(prior).__name__, "must be a Calibration")
    if prior_weight <= 0 or not np.isfinite(prior_weight):
        raise InvalidInputError("prior_weight", prior_weight, "must be finite and > 0")
    bins = prior.bin_of(obs.raw_tokens) if obs.tokens.size else np.zeros(0, dtype=int)
    r = obs.log_residual
    cens = ~obs.finished
    runaway0 = prior.runaway or (0.0,) * len(prior.centres)
    bias, sigma, runaway, n, hists = [], [], [], [], []
    for b in range(len(prior.centres)):
        sel = bins == b
        k = int(sel.sum())
        mu0, s0, rho0 = prior.log_bias[b], prior.log_sigma[b], float(runaway0[b])
        if k == 0:
            bias.append(mu0), sigma.append(s0), runaway.append(rho0), n.append(0)
            if prior.histograms:
                hists.append(prior.histograms[b])
            continue
        mu, s, rho, post = _cure_fit(r[sel], cens[sel], mu0, s0, rho0, prior_weight)
        bias.append(mu), sigma.append(s), runaway.append(rho), n.append(k)
        if prior.histograms:
            hists.append(_histogram(prior.histograms[b], r[sel], cens[sel], post, rho, prior_weight / (k + prior_weight)))
    return Calibration(tuple(prior.centres), tuple(bias), tuple(sigma), tuple(n),
                       tuple(runaway) if prior.runaway else (), tuple(hists))
