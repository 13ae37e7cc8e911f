"""Clearing on the expected utility Phi(ln(c / tau) / sigma) (clear_core.uncertainty)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy.stats import norm

from clear_core.errors import InvalidInputError
from clear_core.uncertainty import clear_market_lognormal, optimal_coverage, solvency_kappa


def expected_solved(caps, tau, sigma):
    caps = np.asarray(caps, float)
    with np.errstate(divide="ignore"):
        return float(np.where(caps > 0, norm.cdf(np.log(np.maximum(caps, 1e-300) / tau) / sigma), 0.0).sum())


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("lam_tau", [1e-4, 1e-2, 0.1])
def test_first_order_condition(sigma, lam_tau):
    """d/dc Phi(ln(c/tau)/sigma) = lam at c* = tau exp(sigma u*)."""
    tau, lam = 300.0, lam_tau / 300.0
    u = float(optimal_coverage(lam * sigma * tau, sigma))
    c = tau * math.exp(sigma * u)
    # Analytic derivative of the success probability at c...
    assert_allclose(norm.pdf(math.log(c / tau) / sigma) / (sigma * c), lam, rtol=1e-9)
    # ...and c* is a local maximum of p(c) - lam c (concave side of the S-curve).
    p = lambda t: norm.cdf(math.log(t / tau) / sigma) - lam * t  # noqa: E731
    assert p(c) >= max(p(c * 0.99), p(c * 1.01))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_surplus_vanishes_at_the_solvency_price(sigma):
    k0 = solvency_kappa(sigma)
    u = float(optimal_coverage(k0, sigma))
    assert abs(norm.cdf(u) - k0 / sigma * math.exp(sigma * u)) < 1e-9
    # Brute force: at kappa slightly above k0 no cap has positive surplus.
    tau, lam = 100.0, 1.01 * k0 / (sigma * 100.0)
    caps = np.linspace(1e-3, 100 * tau, 200001)
    assert (norm.cdf(np.log(caps / tau) / sigma) - lam * caps <= 1e-12).all()


def test_allocation_is_locally_optimal_for_expected_solved():
    """Moving tokens between two admitted queries never raises expected solved much."""
    rng = np.random.default_rng(0)
    sigma = 0.5
    tau = rng.lognormal(6, 1, 200)
    budget = 300.0 * tau.size
    r = clear_market_lognormal(tau, budget, log_sigma=sigma, fill_unused=False)
    base = expected_solved(r.caps, tau, sigma)
    active = np.flatnonzero(r.active)
    for _ in range(300):
        i, j = rng.choice(active, 2, replace=False)
        delta = min(50.0, r.caps[j] - 1)
        caps = r.caps.astype(float).copy()
        caps[i] += delta
        caps[j] -= delta
        assert expected_solved(caps, tau, sigma) <= base + 1e-3


def test_beats_uniform_and_the_point_estimate_in_expectation():
    rng = np.random.default_rng(1)
    sigma = 0.5
    for bpq in (128, 512, 2048):
        tau = rng.lognormal(6.5, 1.0, 300)
        budget = bpq * tau.size
        ours = clear_market_lognormal(tau, budget, log_sigma=sigma, context_limit_tokens=8192)
        uniform = np.full(tau.size, bpq)
        assert expected_solved(ours.caps, tau, sigma) > expected_solved(uniform, tau, sigma)


def test_abundant_budget_gives_the_context_limit():
    r = clear_market_lognormal([100.0, 900.0, 4000.0], 1e9, log_sigma=0.5, context_limit_tokens=8192)
    assert r.caps.tolist() == [8192, 8192, 8192] and r.shadow_price == 0.0


def test_easiest_first_abandonment():
    rng = np.random.default_rng(4)
    tau = rng.lognormal(6.5, 1.0, 400)
    r = clear_market_lognormal(tau, 100.0 * tau.size, log_sigma=0.5)
    assert 0 < r.active.sum() < tau.size
    assert tau[r.active].max() < tau[~r.active].min()


@settings(max_examples=80, deadline=None)
@given(
    tau=st.lists(st.floats(0, 10_000, allow_nan=False), min_size=1, max_size=50),
    budget=st.floats(0, 400_000),
    sigma=st.floats(0.05, 1.5),
    context_limit_tokens=st.one_of(st.none(), st.integers(1, 9000)),
    fill=st.booleans(),
)
def test_budget_context_and_abandonment(tau, budget, sigma, context_limit_tokens, fill):
    r = clear_market_lognormal(tau, budget, log_sigma=sigma, context_limit_tokens=context_limit_tokens, fill_unused=fill)
    assert r.caps.sum() <= budget and (r.caps >= 0).all()
    if context_limit_tokens is not None:
        assert (r.caps <= context_limit_tokens).all()
    assert (r.caps[~r.active] == 0).all()


def test_bad_sigma():
    with pytest.raises(InvalidInputError, match="log_sigma"):
        clear_market_lognormal([1.0], 10, log_sigma=0.0)
