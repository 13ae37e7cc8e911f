"""clear-cost-emp: hull vertices against brute force, the clearing against a price scan, the budget."""

import math

import numpy as np
import pytest

from clear_core.empirical_market import (
    LOG_RATIO_GRID,
    EmpiricalLengths,
    LengthHistogram,
    _chain,
    _Demand,
    clear_empirical_market,
)
from clear_core.errors import InvalidInputError
from tests.fakes import bimodal, curves


def test_histogram_masses_sum_to_one_and_round_trip():
    h = bimodal()
    assert sum(h.correct) + sum(h.wrong) + h.runaway == pytest.approx(1.0)
    assert 0.05 < h.runaway < 0.15
    assert LengthHistogram.from_dict(h.as_dict()) == h


def test_hull_vertex_is_the_brute_force_best_cap():
    h = bimodal(1)
    value, cost = curves(h)
    demand = _Demand([_chain(h)], np.array([0]), np.array([1.0]), np.array([1.0]), np.array([1.0]), math.inf)
    rng = np.random.default_rng(2)
    for _ in range(200):
        m = int(rng.integers(0, LOG_RATIO_GRID.size + 1))
        p = float(np.exp(rng.uniform(-8, 1)))
        demand.top = np.array([m])
        v = int(demand.vertex(math.log(p))[0])
        surplus = value[: m + 1] - p * cost[: m + 1]
        assert value[v] - p * cost[v] >= surplus.max() - 1e-9, (m, p, v, int(np.argmax(surplus)))


def test_clearing_matches_a_price_scan_and_keeps_the_budget():
    hists = (bimodal(3), bimodal(4))
    rng = np.random.default_rng(5)
    tau = np.exp(rng.uniform(4.5, 7.5, 60))
    which = rng.integers(0, 2, 60)
    w = rng.choice([1.0, 2.0], 60)
    budget = 0.8 * tau.sum()
    res = clear_empirical_market(tau, budget, lengths=EmpiricalLengths(hists, which), weights=w,
                                 context_limit_tokens=8192)
    assert res.converged and 0 < res.shadow_price
    assert res.expected_generated_tokens <= budget * (1 + 1e-9)
    # Brute force: each query's best grid cap at the clearing price (rounded thresholds as the solver has them).
    t = np.exp(np.rint(np.log(tau) * 256) / 256)
    for i in range(60):
        value, cost = curves(hists[which[i]])
        m = int(np.searchsorted(LOG_RATIO_GRID, math.log(8192 / t[i]), side="right"))
        surplus = w[i] * value[: m + 1] - res.shadow_price * t[i] * cost[: m + 1]
        g = int(np.argmax(surplus))
        best = 0 if g == 0 else (8192 if g == m and m < LOG_RATIO_GRID.size else int(t[i] * math.exp(LOG_RATIO_GRID[g - 1])))
        # the solver's cap is a best response, or a marginal query rationed at the boundary (an upgrade)
        got = res.caps[i]
        if got != best:
            assert abs(surplus.max() - surplus[min(range(m + 1), key=lambda k: abs(
                (0 if k == 0 else t[i] * math.exp(LOG_RATIO_GRID[k - 1])) - got))]) < 1e-6 * max(1.0, abs(surplus.max())) \
                or got > best, (i, got, best)


def test_a_bimodal_bin_buys_short_caps_where_a_lognormal_would_abandon():
    """A scarce budget: the short mode is cheap to catch, so queries get caps near it rather than 0."""
    h = bimodal(6)
    tau = np.full(100, 1000.0)
    res = clear_empirical_market(tau, 100 * 600.0, lengths=EmpiricalLengths((h,), np.zeros(100, dtype=int)),
                                 context_limit_tokens=8192)
    admitted = res.caps[res.caps > 0]
    assert admitted.size >= 80
    assert np.median(admitted) < 1000.0 * math.exp(-0.3)  # within the short mode, not the long one


def test_abundant_budget_gives_the_context_limit_and_bad_inputs_are_named():
    h = bimodal(7)
    res = clear_empirical_market([300.0, 900.0], 1e9, lengths=EmpiricalLengths((h,), np.array([0, 0])),
                                 context_limit_tokens=8192)
    assert res.caps.tolist() == [8192, 8192]
    with pytest.raises(InvalidInputError):
        clear_empirical_market([300.0], 1e4, lengths=EmpiricalLengths((h,), np.array([1])))
