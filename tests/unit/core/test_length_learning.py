"""The calibration refitted from censored traffic (clear_core.length_learning), against known synthetic truths."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.calibration import fit_calibration
from clear_core.empirical_market import LOG_RATIO_GRID
from clear_core.length_learning import Observations, refit_calibration, refit_head

CONTEXT = 8192.0


def prior_calibration(seed=0, runaway=0.0):
    """A calibration fitted on traffic whose lengths match the raw predictions (bias 0, spread 0.5)."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(np.log(100), np.log(2000), 4000))
    d = raw * np.exp(rng.normal(0, 0.5, raw.size))
    d[rng.random(raw.size) < runaway] = CONTEXT
    return fit_calibration(raw, np.minimum(d, CONTEXT), bins=4, censor_tokens=CONTEXT,
                           correct=rng.random(raw.size) < 0.8)


def traffic(rng, n, shift, sigma, cap_ratio, runaway=0.0, context_caps=False):
    raw = np.exp(rng.uniform(np.log(100), np.log(2000), n))
    d = raw * np.exp(shift + rng.normal(0, sigma, n))
    ran = rng.random(n) < runaway
    caps = np.full(n, CONTEXT) if context_caps else np.round(raw * cap_ratio)
    finished = (d <= caps) & ~ran
    tokens = np.where(finished, np.round(d), caps)
    return Observations.of(raw, tokens, caps, finished)


def test_a_shorter_traffic_moves_every_bins_bias_though_a_third_of_it_is_capped():
    prior = prior_calibration()
    rng = np.random.default_rng(1)
    obs = traffic(rng, 4000, shift=-0.9, sigma=0.6, cap_ratio=0.5)
    assert 0.25 < (~obs.finished).mean() < 0.5
    cal = refit_calibration(prior, obs)
    assert cal.centres == prior.centres  # the bins keep their meaning
    assert all(abs(b + 0.9) < 0.1 for b in cal.log_bias), cal.log_bias  # held a little by the prior's 0
    assert all(abs(s - 0.6) < 0.06 for s in cal.log_sigma), cal.log_sigma
    # taking a capped length for the length (what the uncensored fit does) would put the bias far lower
    naive = fit_calibration(obs.raw_tokens, obs.tokens, bins=4)
    assert max(naive.log_bias) < -1.0


def test_runaway_shares_are_learned_from_what_finishes_and_what_never_does():
    prior = prior_calibration(runaway=0.15)
    assert min(prior.runaway) > 0.1
    rng = np.random.default_rng(2)
    none = refit_calibration(prior, traffic(rng, 4000, 0.0, 0.5, 1.0, runaway=0.0, context_caps=True))
    assert max(none.runaway) < 0.02  # every request finished: no runaways, whatever the prior said
    fifth = refit_calibration(prior, traffic(rng, 4000, 0.0, 0.5, 1.0, runaway=0.2, context_caps=True))
    assert all(abs(r - 0.2) < 0.04 for r in fifth.runaway), fifth.runaway
    # Caps below the typical length: a runaway is told from a long answer only through the log-normal's tail.
    small_caps = refit_calibration(prior, traffic(rng, 4000, 0.0, 0.5, 1.5, runaway=0.2))
    assert abs(np.mean(small_caps.runaway) - 0.2) < 0.04 and all(abs(r - 0.2) < 0.1 for r in small_caps.runaway)


def test_a_bins_histogram_is_a_distribution_centred_where_the_lengths_are():
    prior = prior_calibration()
    rng = np.random.default_rng(3)
    cal = refit_calibration(prior, traffic(rng, 6000, shift=-0.9, sigma=0.6, cap_ratio=0.5))
    for h in cal.histograms:
        total = sum(h.correct) + sum(h.wrong) + h.runaway
        assert abs(total - 1.0) < 1e-9
        fin = np.asarray(h.correct) + np.asarray(h.wrong)
        median = LOG_RATIO_GRID[np.searchsorted(np.cumsum(fin) / fin.sum(), 0.5)]
        assert abs(median + 0.9) < 0.2, median  # the prior's was 0
        # the prior's share of correct answers is kept cell by cell (the service never sees correctness)
        assert 0.7 < sum(h.correct) / fin.sum() < 0.9


def test_a_bin_nobody_reached_keeps_the_prior_and_a_few_requests_move_it_a_little():
    prior = prior_calibration()
    rng = np.random.default_rng(4)
    obs = traffic(rng, 4000, -0.9, 0.6, 0.5)
    low = obs.raw_tokens < np.exp(prior.centres[0] + 0.1)
    only_low = Observations.of(obs.raw_tokens[low], obs.tokens[low], obs.caps[low], obs.finished[low])
    cal = refit_calibration(prior, only_low)
    assert cal.log_bias[-1] == prior.log_bias[-1] and cal.histograms[-1] == prior.histograms[-1]
    few = Observations.of(obs.raw_tokens[:12], obs.tokens[:12], obs.caps[:12], obs.finished[:12])
    nudged = refit_calibration(prior, few)
    moved = [abs(a - b) for a, b in zip(nudged.log_bias, prior.log_bias)]
    assert max(moved) < 0.6 and any(m > 0 for m in moved)  # towards -0.9, held by 30 pseudo-observations


def test_the_head_refit_is_the_censored_fit_of_log_lengths_towards_the_prior():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 3))
    d = np.exp(x @ np.array([0.3, -0.2, 0.1]) + 5.5 + rng.normal(0, 0.5, 3000))
    caps = np.full(3000, 300.0)
    fin = d <= caps
    fit = refit_head(x, np.where(fin, d, caps), caps, fin, prior_coef=np.zeros(3), prior_intercept=6.7, alpha=1.0)
    assert abs(fit.intercept - 5.5) < 0.05 and np.allclose(fit.coef, [0.3, -0.2, 0.1], atol=0.05)


def test_observations_are_checked():
    from clear_core.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        Observations.of([100.0], [10.0, 20.0], [50.0], [True])
    with pytest.raises(InvalidInputError):
        Observations.of([0.0], [10.0], [50.0], [True])
