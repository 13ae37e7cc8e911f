"""clear-cost's market on expected generated tokens, against quadrature and brute force."""

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import ndtr

from clear_core import consumption as C
from clear_core.errors import InvalidInputError


def on_grid(tau, sigma):
    """Thresholds and spreads the solver does not round (it is exact for these)."""
    t = np.exp(np.rint(np.log(tau) / C.LOG_TAU_STEP) * C.LOG_TAU_STEP)
    s = C.sigma_of_index(int(C.sigma_grid_index(np.array([sigma]))[0]))
    return t, s


def true_expected(cap, tau, sigma, rho):
    """E[min(D, cap)] by quadrature of the survival function: finishing part + runaways at the cap."""
    surv = quad(lambda x: 1.0 - ndtr(math.log(max(x, 1e-300) / tau) / sigma), 0.0, cap, limit=200)[0]
    return (1 - rho) * surv + rho * cap


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.3])
@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_expected_generated_matches_quadrature(sigma, rho):
    tau = 700.0
    for cap in (50.0, 700.0, 2500.0, 8192.0):
        got = float(C.expected_generated([cap], [tau], sigma, rho)[0])
        assert got == pytest.approx(true_expected(cap, tau, sigma, rho), rel=1e-6)


@pytest.mark.parametrize("sigma,eta", [(0.3, 0.0), (0.5, 0.0), (1.0, 0.05), (2.0, 0.5)])
def test_coverage_table_solves_the_first_order_condition(sigma, eta):
    """At u*(x) the marginal value of coverage equals the price: phi(u) = kappa e^{sigma u}(1 - Phi(u) + eta)."""
    t = C.coverage_table(sigma, eta)
    for k in np.linspace(0, t.coverage.size - 1, 9).astype(int):
        u = t.coverage[k]
        kappa = math.exp(t.x0 - k * C.LOG_KAPPA_STEP)
        lhs = math.exp(-u * u / 2) / math.sqrt(2 * math.pi)
        rhs = kappa * math.exp(sigma * u) * (1 - ndtr(u) + eta)
        assert lhs == pytest.approx(rhs, rel=1e-8)
        # ... on the falling branch (second-order condition)
        assert u >= C.coverage_peak(sigma, eta) - 1e-9


def brute_best_cap(tau, sigma, rho, weight, price, t_max, grid):
    """The cap in ``grid`` (and 0) maximising weight P(finish) - price E[min(D, cap)], within the coverage ceiling."""
    grid = grid[grid <= tau * math.exp(sigma * C.MAX_COVERAGE_U) * (1 + 1e-9)]
    p = (1 - rho) * ndtr(np.log(grid / tau) / sigma)
    cost = C.expected_generated(grid, np.full(grid.size, tau), sigma, rho)
    value = weight * p - price * cost
    best = int(np.argmax(value))
    return (grid[best], value[best]) if value[best] > 0 else (0.0, 0.0)


def test_each_cap_is_the_brute_force_best_response_at_the_clearing_price():
    rng = np.random.default_rng(3)
    t_max = 8192.0
    grid = np.unique(np.concatenate([np.geomspace(1, t_max, 4000), [t_max]]))
    for trial in range(4):
        n = 6
        tau, sig = on_grid(rng.lognormal(6, 0.8, n), 0.5)
        rho = rng.choice([0.0, 0.1], n)
        rho_grid = C.runaway_odds(rho)  # odds are rounded on a 5% grid: use the rounded ones
        rho = np.array([C.eta_of_index(int(j)) for j in C.eta_grid_index(rho_grid)])
        rho = rho / (1 + rho)
        w = rng.choice([1.0, 3.0], n)
        budget = float(rng.uniform(0.3, 0.8) * tau.sum())
        res = C.clear_consumption_market(tau, budget, log_sigma=sig, runaway=rho, weights=w,
                                         context_limit_tokens=t_max, fill_unused=False)
        assert res.converged and res.shadow_price > 0
        for i in range(n):
            cap, value = brute_best_cap(tau[i], sig, rho[i], w[i], res.shadow_price, t_max, grid)
            got = res.caps[i]
            got_value = (w[i] * (1 - rho[i]) * ndtr(math.log(max(got, 1e-300) / tau[i]) / sig)
                         - res.shadow_price * C.expected_generated([got], [tau[i]], sig, rho[i])[0]) if got else 0.0
            # The solver's cap is as good as the best cap on a fine grid (up to the grid's step).
            assert got_value >= value - 1e-4 * w[i], (trial, i, got, cap)
            assert (got > 0) == (cap > 0) or abs(value) < 1e-4 * w[i], (trial, i, got, cap)


def test_clearing_price_matches_a_brute_force_price_scan():
    """Scan the price; brute-force every query's best cap; the lowest price whose demand fits is the solver's."""
    rng = np.random.default_rng(7)
    t_max = 8192.0
    grid = np.unique(np.concatenate([np.geomspace(1, t_max, 3000), [t_max]]))
    tau, sig = on_grid(rng.lognormal(6, 0.7, 5), 0.8)
    w = np.array([1.0, 1.0, 2.0, 0.5, 1.0])
    budget = 0.6 * tau.sum()
    res = C.clear_consumption_market(tau, budget, log_sigma=sig, weights=w, context_limit_tokens=t_max,
                                     fill_unused=False)
    prices = res.shadow_price * np.exp(np.linspace(-0.3, 0.3, 61))
    fits = []
    for lam in prices:
        caps = [brute_best_cap(tau[i], sig, 0.0, w[i], lam, t_max, grid)[0] for i in range(tau.size)]
        fits.append(C.expected_generated(caps, tau, sig).sum() <= budget)
    fits = np.array(fits)
    assert fits[-1] and not fits[0]
    first_fit = prices[int(np.argmax(fits))]
    assert first_fit == pytest.approx(res.shadow_price, rel=0.011)  # one step of the scan


def test_weights_break_the_easiest_first_order():
    """Equal queries: the heavier one is admitted under scarcity. A harder heavy one beats a light easy one."""
    tau = np.array([500.0, 500.0])
    res = C.clear_consumption_market(tau, 600.0, log_sigma=0.4, weights=[1.0, 4.0], context_limit_tokens=8192)
    assert res.caps[0] == 0 and res.caps[1] > 0
    tau = np.array([400.0, 900.0])
    res = C.clear_consumption_market(tau, 1000.0, log_sigma=0.4, weights=[1.0, 5.0], context_limit_tokens=8192)
    assert res.caps[0] == 0 and res.caps[1] > 0
    unweighted = C.clear_consumption_market(tau, 1000.0, log_sigma=0.4, context_limit_tokens=8192)
    assert unweighted.caps[0] > 0 and unweighted.caps[1] == 0


def test_caps_stop_at_the_coverage_ceiling_under_scarcity():
    tau = np.full(40, 500.0)
    res = C.clear_consumption_market(tau, 40 * 400.0, log_sigma=0.5, context_limit_tokens=8192)
    assert res.shadow_price > 0
    assert res.caps.max() <= 500.0 * math.exp(0.5 * C.MAX_COVERAGE_U) + 1
    assert C.MAX_COVERAGE_U == pytest.approx(3.0902, abs=1e-3)  # Phi^-1(0.999)


def test_abundant_budget_gives_every_query_the_context_limit():
    tau = np.array([100.0, 800.0, 3000.0])
    res = C.clear_consumption_market(tau, 1e7, log_sigma=0.5, context_limit_tokens=8192)
    assert res.shadow_price == 0.0
    assert res.caps.tolist() == [8192, 8192, 8192]


def test_runaways_make_caps_finite_and_cheaper():
    """A query that may never finish costs its whole cap with probability rho: its cap shrinks."""
    tau = np.full(50, 600.0)
    plain = C.clear_consumption_market(tau, 300.0 * 50, log_sigma=0.5, context_limit_tokens=8192)
    risky = C.clear_consumption_market(tau, 300.0 * 50, log_sigma=0.5, runaway=0.3, context_limit_tokens=8192)
    assert risky.caps.max() < plain.caps.max()
    assert risky.expected_generated_tokens <= 300.0 * 50 * (1 + 1e-3)


def test_spends_the_budget_and_is_invariant_to_order():
    rng = np.random.default_rng(0)
    tau = rng.lognormal(6.5, 1.0, 400)
    sig = rng.uniform(0.2, 1.2, 400)
    res = C.clear_consumption_market(tau, 300.0 * 400, log_sigma=sig, runaway=0.05, context_limit_tokens=8192)
    exact = C.expected_generated(res.caps, tau, sig, 0.05).sum()
    assert exact == pytest.approx(300.0 * 400, rel=0.01)  # filled, within the rounding of thresholds and spreads
    perm = rng.permutation(400)
    again = C.clear_consumption_market(tau[perm], 300.0 * 400, log_sigma=sig[perm], runaway=0.05,
                                       context_limit_tokens=8192)
    assert np.array_equal(again.caps, res.caps[perm])


@pytest.mark.parametrize("kw", [dict(log_sigma=0.0), dict(log_sigma=-1.0), dict(log_sigma=0.5, weights=[0.0]),
                                dict(log_sigma=0.5, runaway=1.0), dict(log_sigma=float("nan"))])
def test_bad_inputs_are_named(kw):
    with pytest.raises(InvalidInputError):
        C.clear_consumption_market([100.0], 1000.0, **kw)
