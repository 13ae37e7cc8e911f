"""Calibrated predictive spread: each query's own log-normal length distribution.

A predictor gives a point estimate ``tau_hat`` of a query's length. The
markets that price uncertainty (``clear``, ``clear-cost``) need a
*distribution*: the true length ``D = tau exp(sigma Z)`` with a calibrated
median ``tau`` and spread ``sigma``. One global ``sigma`` (the predictor's
RMSE of log length) is far from the truth: the error grows with the predicted
length (RMSE of log length 0.32 on GSM8K, 1.2-1.3 on AMC/AIME), and a
regressor trained with MSE on log length shrinks towards the mean, so long
predictions are biased short and short ones long.

:class:`Calibration` is a function of the predicted log length: its residuals
``ln d - ln tau_hat`` are binned by quantiles of ``ln tau_hat``; each bin has a
bias (the mean residual), a spread and a runaway share; the bias is
interpolated linearly between the bins' centres (flat beyond the ends), the
spread and runaway share are the nearest bin's. The
calibrated median is ``tau_hat exp(bias)`` and the spread ``sigma``.
:func:`fold_of` assigns groups (problems) to folds, so that a caller can
apply it *out of fold*: each problem's calibration fitted on the other folds only.
Queries whose observed length reached the recording's cap never finished (a
runaway generation): each bin also has the share of those, ``rho``, which the
consumption market prices (a runaway generates its whole cap).

:func:`coverage_table` measures calibration the way the market uses it: for
caps, the predicted probability of finishing ``Phi(ln(c / tau) / sigma)``
against the observed share that finished, binned.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from clear_core.empirical_market import SMOOTHING_LOG, LengthHistogram
from clear_core.errors import InvalidInputError

#: Default number of bins of predicted log length, and the fewest residuals a bin may have.
DEFAULT_BINS = 8
MIN_PER_BIN = 20
#: Spreads are floored at this (a bin whose residuals are all equal would claim certainty).
MIN_LOG_SIGMA = 0.05
#: Default strength of the prior each bin's histogram is shrunk towards, in pseudo-*problems* when
#: ``fit_calibration`` is given ``clusters`` (samples otherwise). Chosen on the bench's allocation results
#: (docs/results/cost-markets.md, "How the histogram defaults were chosen"), not on held-out likelihood,
#: which prefers about 2.
DEFAULT_SHRINK = 30.0
#: Folds of the out-of-fold calibration.
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class Calibration:
    """Bias and spread of log length as functions of the predicted log length."""

    centres: tuple[float, ...]  # bin centres: mean ln(tau_hat) of each bin
    log_bias: tuple[float, ...]  # mean of ln d - ln tau_hat per bin
    log_sigma: tuple[float, ...]  # spread of ln d - ln tau_hat per bin (>= MIN_LOG_SIGMA), finishing queries
    n: tuple[int, ...]  # residuals per bin
    runaway: tuple[float, ...] = ()  # share of the bin that never finished within the recording's cap
    histograms: tuple = ()  # per bin, the empirical LengthHistogram of ln(d / tau_hat) (fitted with correctness)

    def apply(self, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibrated medians, spreads and runaway probabilities for predicted thresholds (tokens)."""
        x = np.log(np.maximum(np.asarray(thresholds, dtype=float), 1.0))
        c = np.asarray(self.centres)
        bias = np.interp(x, c, np.asarray(self.log_bias))
        # Spread and runaway share of the nearest bin: a few distinct values, so the consumption
        # market builds few coverage tables (the bias moves the median smoothly instead).
        edges = 0.5 * (c[1:] + c[:-1])
        b = np.searchsorted(edges, x)
        sigma = np.asarray(self.log_sigma)[b]
        runaway = np.asarray(self.runaway)[b] if self.runaway else np.zeros_like(x)
        return np.exp(x + bias), sigma, runaway

    def bin_of(self, thresholds) -> np.ndarray:
        """The nearest bin of each predicted threshold."""
        x = np.log(np.maximum(np.asarray(thresholds, dtype=float), 1.0))
        c = np.asarray(self.centres)
        return np.searchsorted(0.5 * (c[1:] + c[:-1]), x)

    def as_dict(self) -> dict:
        d = {k: list(getattr(self, k)) for k in ("centres", "log_bias", "log_sigma", "n", "runaway")}
        d["histograms"] = [h.as_dict() for h in self.histograms]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        try:
            cal = cls(*(tuple(d[k]) for k in ("centres", "log_bias", "log_sigma", "n")), tuple(d.get("runaway", ())),
                      tuple(LengthHistogram.from_dict(h) for h in d.get("histograms", ())))
        except (KeyError, TypeError) as exc:
            raise InvalidInputError("calibration", str(d)[:80], f"expected centres, log_bias, log_sigma, n: {exc}") from None
        sizes = {len(cal.centres), len(cal.log_bias), len(cal.log_sigma), len(cal.n)}
        for extra in (cal.runaway, cal.histograms):
            if extra:
                sizes.add(len(extra))
        if len(sizes) != 1 or not cal.centres or any(s < MIN_LOG_SIGMA for s in cal.log_sigma):
            raise InvalidInputError("calibration", str(d)[:80], "needs equal, non-empty lists and spreads >= 0.05")
        if any(b <= a for a, b in zip(cal.centres, cal.centres[1:])):
            raise InvalidInputError("calibration", cal.centres, "centres must increase")
        return cal


def fit_calibration(predicted, observed, *, bins: int = DEFAULT_BINS, censor_tokens: float | None = None,
                    weights=None, correct=None, shrink: float = DEFAULT_SHRINK, clusters=None,
                    smoothing: float = SMOOTHING_LOG) -> Calibration:
    """Fit bias, spread and runaway share per quantile bin of ``ln predicted``.

    ``predicted`` and ``observed`` are token counts, one pair per query (a
    problem with several samples contributes one pair per sample). With
    ``censor_tokens`` (the cap the observations were recorded under), an
    observation at or above it never finished: it counts towards the bin's
    runaway share and not towards its log-normal. The log-normal's median is
    the mean log residual; its spread is the larger of the residuals' standard
    deviation and the spread whose mean ``exp(mu + sigma^2 / 2)`` matches the
    residuals' arithmetic mean, so a right-skewed bin does not understate what
    its queries cost. Bins with fewer than :data:`MIN_PER_BIN` residuals are
    merged into a neighbour. ``weights`` (one per pair, >= 0) make the fit
    that of a population with another composition (bins hold equal weight).
    With ``correct`` (one flag per pair) each bin also gets the empirical
    histogram of its residuals (:class:`clear_core.empirical_market.LengthHistogram`).

    ``shrink`` (pseudo-samples, >= 0) shrinks each bin's histogram towards
    the histogram of *every* pair's length, placed at the bin's centre: the
    posterior predictive of a Dirichlet prior whose base measure says "the
    prediction tells nothing", with weight ``shrink / (n_eff + shrink)``
    (``n_eff`` the bin's effective sample size under ``weights``; with
    ``clusters``, one label per pair such as its problem, a cluster's pairs
    count as one draw: the samples of one problem are not independent
    evidence about the next problem). A bin of a
    few dozen hard problems then keeps the chance of a short answer that the
    whole population shows, instead of trusting its own few samples.

    ``smoothing``: the kernel width, in ln length, that smooths each histogram
    (:meth:`clear_core.empirical_market.LengthHistogram.fit`).
    """
    p = np.log(np.maximum(np.asarray(predicted, dtype=float), 1.0))
    obs = np.asarray(observed, dtype=float)
    d = np.log(np.maximum(obs, 1.0))
    if p.shape != d.shape or p.ndim != 1:
        raise InvalidInputError("calibration", f"shapes {p.shape} and {d.shape}", "need two equal 1-D arrays")
    if p.size < 2 * MIN_PER_BIN:
        raise InvalidInputError("calibration", p.size, f"needs at least {2 * MIN_PER_BIN} residuals")
    if bins < 1:
        raise InvalidInputError("bins", bins, "must be >= 1")
    if not (math.isfinite(shrink) and shrink >= 0):
        raise InvalidInputError("shrink", shrink, "must be finite and >= 0")
    w = np.ones(p.size) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != p.shape or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise InvalidInputError("weights", "calibration weights", "need one finite weight >= 0 per pair, not all 0")
    keep = w > 0
    ok = np.ones(p.size, dtype=bool) if correct is None else np.asarray(correct, dtype=bool)
    cluster = np.arange(p.size) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    if cluster.shape != p.shape:
        raise InvalidInputError("clusters", cluster.shape, "need one label per pair")
    p, d, obs, w, ok, cluster = p[keep], d[keep], obs[keep], w[keep], ok[keep], cluster[keep]
    ran = np.zeros(p.size, dtype=bool) if censor_tokens is None else obs >= censor_tokens
    order = np.argsort(p, kind="stable")
    k = max(1, min(bins, p.size // MIN_PER_BIN))
    # Bins of equal weight along the predicted length.
    cum = np.cumsum(w[order]) / w.sum()
    cuts = np.searchsorted(cum, np.arange(1, k) / k, side="left")
    groups = [g for g in np.split(order, cuts) if g.size]
    resid = d - p
    rows: list[tuple] = []
    merged = None
    for g in groups:
        if rows and (float(np.average(p[g], weights=w[g])) <= rows[-1][0] or g.size < MIN_PER_BIN):
            rows.pop()  # ties across a bin edge, or too few pairs: merge into the previous bin
            g = np.concatenate([merged, g])
        merged = g
        done = g[~ran[g]] if (~ran[g]).sum() > 1 else g
        r, rw = resid[done], w[done]
        mu = float(np.average(r, weights=rw))
        sd = float(np.sqrt(np.average((r - mu) ** 2, weights=rw) * r.size / max(r.size - 1, 1)))
        # The spread whose log-normal mean matches the arithmetic mean of the residuals.
        excess = float(np.log(np.average(np.exp(r - mu), weights=rw)))
        sigma = max(sd, math.sqrt(2.0 * max(excess, 0.0)), MIN_LOG_SIGMA)
        centre = float(np.average(p[g], weights=w[g]))
        hist = None
        if correct is not None:
            hist = LengthHistogram.fit(resid[g], ok[g], ran[g], w[g], smoothing=smoothing)
            if shrink > 0:
                per = np.bincount(cluster[g], weights=w[g])  # weight of each cluster in the bin
                n_eff = float(per.sum() ** 2 / np.square(per).sum())
                prior = LengthHistogram.fit(d - centre, ok, ran, w, smoothing=smoothing)  # every length, as if predicted at the centre
                hist = hist.mixed(prior, shrink / (n_eff + shrink))
        rows.append((centre, mu, sigma, int(g.size), float(np.average(ran[g], weights=w[g])),
                     hist))
    centres, bias, sigma, n, runaway, hists = (tuple(col) for col in zip(*rows))
    return Calibration(centres, bias, sigma, n, runaway, hists if correct is not None else ())


def histogram_log_likelihood(cal: Calibration, predicted, observed, *, censor_tokens: float | None = None,
                             weights=None) -> float:
    """Mean log-likelihood of observed lengths under ``cal``'s bin histograms (per pair, weighted).

    A finished length scores the mass of its grid cell in the histogram of
    its prediction's bin; one at or above ``censor_tokens`` the bin's runaway
    share. Out of fold (``cal`` fitted without these pairs) it measures how
    well the histograms predict new queries: :func:`fit_calibration`'s
    ``shrink`` is chosen by it (``benchmarks/histogram_prior.py``).
    """
    from clear_core.empirical_market import LOG_RATIO_GRID

    if not cal.histograms:
        raise InvalidInputError("calibration", "no histograms", "fit it with correct= to score lengths")
    pred = np.asarray(predicted, dtype=float)
    obs = np.asarray(observed, dtype=float)
    w = np.ones(pred.size) if weights is None else np.asarray(weights, dtype=float)
    r = np.log(np.maximum(obs, 1.0)) - np.log(np.maximum(pred, 1.0))
    ran = (obs >= censor_tokens) if censor_tokens is not None else np.zeros(obs.size, dtype=bool)
    cell = np.minimum(np.searchsorted(LOG_RATIO_GRID, r, side="left"), LOG_RATIO_GRID.size - 1)
    b = cal.bin_of(pred)
    finished = np.array([np.asarray(h.correct) + np.asarray(h.wrong) for h in cal.histograms])
    runaway = np.array([h.runaway for h in cal.histograms])
    p = np.where(ran | (r > LOG_RATIO_GRID[-1]), runaway[b], finished[b, cell])
    return float(np.average(np.log(np.maximum(p, 1e-12)), weights=w))


def fold_of(group: str, folds: int) -> int:
    """A stable fold for a group id (CRC32, so it is the same in every process)."""
    return zlib.crc32(group.encode("utf-8")) % folds


@dataclass(frozen=True)
class CoverageRow:
    """One bin of a coverage (reliability) table."""

    predicted: float  # mean predicted probability of finishing within the cap
    observed: float  # share that finished within the cap
    n: int  # caps in the bin


def coverage_table(caps, tokens, thresholds, sigmas, runaway=0.0, *, bins: int = 10,
                   censor_tokens: float | None = None) -> list[CoverageRow]:
    """Predicted vs observed coverage of positive caps, in equal-width bins of predicted probability.

    The predicted probability of finishing within a cap is
    ``(1 - rho) Phi(ln(cap / tau) / sigma)``; it is observed as ``tokens <= cap``
    for a query that finished (below ``censor_tokens``, the recording's cap).
    """
    caps = np.asarray(caps, dtype=float)
    keep = caps > 0
    sig = np.broadcast_to(np.asarray(sigmas, dtype=float), caps.shape)[keep]
    rho = np.broadcast_to(np.asarray(runaway, dtype=float), caps.shape)[keep]
    tau = np.asarray(thresholds, dtype=float)[keep]
    prob = (1.0 - rho) * ndtr(np.log(caps[keep] / np.maximum(tau, 1.0)) / np.maximum(sig, 1e-12))
    tok = np.asarray(tokens, dtype=float)[keep]
    hit = (tok <= caps[keep]) & (tok < (np.inf if censor_tokens is None else censor_tokens))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        if m.any():
            rows.append(CoverageRow(float(prob[m].mean()), float(hit[m].mean()), int(m.sum())))
    return rows


def coverage_error(rows: list[CoverageRow]) -> float:
    """Expected calibration error: the caps-weighted mean |predicted - observed| over the bins."""
    total = sum(r.n for r in rows)
    return math.nan if total == 0 else sum(r.n * abs(r.predicted - r.observed) for r in rows) / total


#: Nominal coverage levels of :func:`quantile_coverage`.
COVERAGE_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def quantile_coverage(tokens, thresholds, sigmas, runaway=0.0, *, levels=COVERAGE_LEVELS,
                      censor_tokens: float | None = None) -> list[tuple[float, float]]:
    """(predicted, observed share with ``tokens <= cap_q``) for the q-quantile cap of every query.

    The cap that finishes a query with probability q under its distribution
    is ``tau exp(sigma Phi^-1(q / (1 - rho)))``; when ``q >= 1 - rho`` no cap
    reaches q, the cap is unbounded and the query's predicted share is
    ``1 - rho``: the predicted value is the mean of ``min(q, 1 - rho)``. A calibrated model finishes a share q of queries within
    their q-caps, for every q; a query at or above ``censor_tokens`` (the
    recording's cap) never finished.
    """
    from scipy.special import ndtri

    tokens = np.asarray(tokens, dtype=float)
    tau = np.asarray(thresholds, dtype=float)
    sig = np.broadcast_to(np.asarray(sigmas, dtype=float), tau.shape)
    rho = np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape)
    out = []
    for q in levels:
        frac = q / np.maximum(1.0 - rho, 1e-12)
        with np.errstate(invalid="ignore", divide="ignore"):
            cap = np.where(frac < 1.0, tau * np.exp(sig * ndtri(np.minimum(frac, 1.0 - 1e-15))), np.inf)
        finished = tokens < (np.inf if censor_tokens is None else censor_tokens)
        # A query that runs away with probability rho finishes within any cap with at most 1 - rho.
        nominal = np.minimum(q, 1.0 - rho)
        out.append((float(nominal.mean()), float(np.mean((tokens <= cap) & finished))))
    return out


def quantile_coverage_error(pairs) -> float:
    """Mean |observed - nominal| over the levels of :func:`quantile_coverage`."""
    return float(np.mean([abs(o - q) for q, o in pairs])) if pairs else math.nan
