"""Right-censored lengths (clear_core.censored): closed forms, brute force, and the loop a naive refit falls into."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from clear_core.censored import censored_log_likelihood, fit_censored_ridge, kaplan_meier


def test_without_censoring_or_prior_the_fit_is_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = x @ np.array([0.5, -0.2, 0.0, 0.3, 0.1]) + 6.0 + rng.normal(0, 0.7, 400)
    fit = fit_censored_ridge(x, y, np.zeros(400, bool))
    design = np.column_stack([x, np.ones(400)])
    ols = np.linalg.lstsq(design, y, rcond=None)[0]
    resid = y - design @ ols
    assert np.allclose(fit.coef, ols[:5], atol=1e-5) and abs(fit.intercept - ols[5]) < 1e-5
    assert abs(fit.sigma - np.sqrt(np.mean(resid ** 2))) < 1e-5  # the maximum-likelihood spread


def test_a_censored_location_and_scale_is_the_likelihoods_maximum_found_by_brute_force():
    rng = np.random.default_rng(1)
    d = rng.normal(6.0, 0.8, 300)
    caps = rng.uniform(5.0, 7.5, 300)
    cens = d > caps
    y = np.minimum(d, caps)
    fit = fit_censored_ridge(None, y, cens)
    mus, sigmas = np.linspace(5.6, 6.4, 161), np.linspace(0.5, 1.2, 141)
    grid = np.array([[censored_log_likelihood(None, y, cens, [], m, s).sum() for s in sigmas] for m in mus])
    i, j = np.unravel_index(np.argmax(grid), grid.shape)
    assert abs(fit.intercept - mus[i]) <= 0.006 and abs(fit.sigma - sigmas[j]) <= 0.006
    assert fit.n_censored == int(cens.sum()) > 50


def test_the_likelihood_of_a_capped_request_is_the_chance_of_exceeding_its_cap():
    ll = censored_log_likelihood(None, [np.log(300.0), np.log(300.0)], [True, False], [], np.log(200.0), 0.5)
    z = (np.log(300.0) - np.log(200.0)) / 0.5
    assert np.isclose(ll[0], norm.logsf(z)) and np.isclose(ll[1], norm.logpdf(z) - np.log(0.5))


def _traffic(rng, n, beta, b, sigma):
    x = rng.normal(0, 1, size=(n, beta.size))
    return x, x @ beta + b + rng.normal(0, sigma, n)


def test_heavily_capped_traffic_recovers_the_true_model_where_taking_caps_for_lengths_does_not():
    rng = np.random.default_rng(2)
    beta, b, sigma = np.array([0.4, -0.3, 0.2]), 6.0, 0.6
    x, d = _traffic(rng, 3000, beta, b, sigma)
    cap = np.log(np.full(d.size, 450.0))  # half the requests stop at their cap (e^6 = 403)
    cens = d > cap
    y = np.minimum(d, cap)
    assert 0.4 < cens.mean() < 0.7
    fit = fit_censored_ridge(x, y, cens)
    assert np.allclose(fit.coef, beta, atol=0.05) and abs(fit.intercept - b) < 0.05 and abs(fit.sigma - sigma) < 0.05
    naive = fit_censored_ridge(x, y, np.zeros(d.size, bool))
    assert naive.intercept < b - 0.15 and naive.sigma < sigma - 0.15


def test_a_naive_refit_spirals_down_and_the_censored_one_does_not():
    """The service's loop: caps come from the current model (its predicted median, the threshold the market
    prices around), the model refits on what those caps let it see. Taking a capped length for the length
    lowers the next caps, which censor more."""
    rng = np.random.default_rng(3)
    beta, b, sigma = np.array([0.3, 0.2]), 6.0, 0.7
    models = {"naive": (np.zeros(2), b, sigma), "censored": (np.zeros(2), b, sigma)}  # start from a fair prior
    history = {name: [] for name in models}
    for _ in range(8):
        x, d = _traffic(rng, 1500, beta, b, sigma)
        for name, (coef, intercept, _s) in models.items():
            cap = x @ coef + intercept
            cens = d > cap
            y = np.minimum(d, cap)
            fit = fit_censored_ridge(x, y, cens if name == "censored" else np.zeros(d.size, bool))
            models[name] = (fit.coef, fit.intercept, fit.sigma)
            history[name].append((fit.intercept, cens.mean()))
    naive_b = [h[0] for h in history["naive"]]
    assert all(later < earlier for earlier, later in zip(naive_b, naive_b[1:]))  # down every round
    assert naive_b[-1] < b - 0.8 and history["naive"][-1][1] > 0.85  # and nearly everything is capped
    assert all(abs(h[0] - b) < 0.05 for h in history["censored"])  # the censored fit stays at the truth
    assert all(0.4 < h[1] < 0.6 for h in history["censored"])  # and caps at its median cut half, as they should
    assert np.allclose(models["censored"][0], beta, atol=0.1)


def test_the_prior_holds_a_few_observations_and_yields_to_many():
    rng = np.random.default_rng(4)
    prior = np.array([0.5, 0.5])
    beta, b = np.array([-0.2, 0.1]), 5.0
    few_x, few_d = _traffic(rng, 20, beta, b, 0.5)
    many_x, many_d = _traffic(rng, 5000, beta, b, 0.5)
    held = fit_censored_ridge(few_x, few_d, np.zeros(20, bool), prior_coef=prior, prior_intercept=6.0, alpha=50.0)
    moved = fit_censored_ridge(many_x, many_d, np.zeros(5000, bool), prior_coef=prior, prior_intercept=6.0, alpha=50.0)
    assert np.linalg.norm(held.coef - prior) < np.linalg.norm(held.coef - beta) and held.intercept > 5.5
    assert np.allclose(moved.coef, beta, atol=0.05) and abs(moved.intercept - b) < 0.05


def _redistribute_to_the_right(values, censored):
    """Efron's construction of the product-limit estimate: each censored value hands its mass, in equal
    shares, to every value to its right (events before censorings at ties). Independent of the KM formula."""
    order = np.lexsort((np.asarray(censored, int), values))
    v, c = np.asarray(values, float)[order], np.asarray(censored, bool)[order]
    mass = np.full(v.size, 1.0 / v.size)
    for i in range(v.size):
        if c[i] and i + 1 < v.size:
            mass[i + 1:] += mass[i] / (v.size - i - 1)
            mass[i] = 0.0
    times = np.unique(v[~c])
    survival = np.array([1.0 - mass[(~c) & (v <= t)].sum() for t in times])
    return times, survival


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans()), min_size=1, max_size=40))
def test_kaplan_meier_is_efrons_redistribution_to_the_right(rows):
    values = np.array([r[0] for r in rows], float)
    censored = np.array([r[1] for r in rows])
    times, survival = kaplan_meier(values, censored)
    t2, s2 = _redistribute_to_the_right(values, censored)
    assert np.array_equal(times, t2) and np.allclose(survival, s2, atol=1e-12)


def test_kaplan_meier_without_censoring_is_the_empirical_survival():
    v = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    times, survival = kaplan_meier(v, np.zeros(5, bool))
    assert np.array_equal(times, [1, 2, 3, 5]) and np.allclose(survival, [0.8, 0.4, 0.2, 0.0])


@pytest.mark.parametrize("bad", [dict(features=np.zeros((3, 2)), log_y=[1.0, 2.0]), dict(log_y=[np.nan])])
def test_bad_inputs_are_refused(bad):
    from clear_core.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        fit_censored_ridge(bad.get("features"), bad["log_y"], np.zeros(len(bad["log_y"]), bool))
