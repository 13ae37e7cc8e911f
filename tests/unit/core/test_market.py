"""Market clearing: exact vs the paper's bisection, optimal vs brute force, invariants."""

import itertools
import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from clear_core.errors import InvalidInputError
from clear_core.market import BISECTION_TOLERANCE, clear_market
from clear_core.utility import make_utility

UTILITIES = ("surge", "triangular", "quadratic")


def make_instance(rng, n=None, scarcity=None, integer=False):
    """A random batch: log-normal thresholds, budget a random share of their sum."""
    n = int(rng.integers(1, 200)) if n is None else n
    tau = rng.lognormal(6.0, 1.2, n)
    if integer:
        tau = np.round(tau / 50) * 50  # many ties
    scarcity = rng.uniform(0.05, 2.0) if scarcity is None else scarcity
    return tau, float(scarcity * tau.sum() + 1.0)


@pytest.mark.parametrize("utility", UTILITIES)
@pytest.mark.parametrize("context_limit_tokens", [None, 3000, 8192])
@pytest.mark.parametrize("integer", [False, True])
def test_exact_agrees_with_reference_bisection(utility, context_limit_tokens, integer):
    rng = np.random.default_rng(zlib.crc32(repr((utility, context_limit_tokens, integer)).encode()))
    for _ in range(40):
        tau, budget = make_instance(rng, integer=integer)
        ref = clear_market(tau, budget, method="bisection", utility=utility, context_limit_tokens=context_limit_tokens, fill_unused=False)
        fast = clear_market(tau, budget, method="exact", utility=utility, context_limit_tokens=context_limit_tokens, fill_unused=False)
        assert abs(ref.shadow_price - fast.shadow_price) <= BISECTION_TOLERANCE
        # The bisection keeps the feasible side of a bracket < 1e-6 wide: a query
        # may only differ if its insolvency price lies inside that bracket.
        differ = np.flatnonzero(ref.active != fast.active)
        curve = make_utility(utility, 2.0, fast.beta)
        breaks = curve.price_at_threshold(tau[differ])
        assert (np.abs(breaks - fast.shadow_price) <= 2 * BISECTION_TOLERANCE).all()
        assert fast.caps.sum() <= budget and ref.caps.sum() <= budget
        if differ.size == 0:
            assert np.abs(ref.caps - fast.caps).max(initial=0) <= 2  # same price up to tolerance


@pytest.mark.parametrize("fill", [True, False])
def test_alpha_invariance_and_linear_price(fill):
    rng = np.random.default_rng(7)
    for _ in range(20):
        tau, budget = make_instance(rng, scarcity=rng.uniform(0.1, 0.9))
        base = clear_market(tau, budget, alpha=1.0, fill_unused=fill)
        for alpha in (0.25, 2.0, 7.5):
            r = clear_market(tau, budget, alpha=alpha, fill_unused=fill)
            np.testing.assert_array_equal(r.caps, base.caps)
            assert_allclose(r.shadow_price, alpha * base.shadow_price, rtol=1e-9, atol=1e-15)


def test_abundant_budget_gives_everyone_the_peak():
    tau = np.array([10.0, 200.0, 3000.0])
    r = clear_market(tau, 1e9, beta=1 / 100, fill_unused=False)
    assert r.shadow_price == 0.0
    np.testing.assert_array_equal(r.caps, np.floor(tau + 100).astype(int))


def test_zero_budget_abandons_everyone():
    r = clear_market([5.0, 50.0], 0)
    assert r.caps.tolist() == [0, 0] and not r.active.any()


def test_queries_beyond_the_context_limit_are_abandoned():
    r = clear_market([100.0, 9000.0], 1e6, context_limit_tokens=8192, beta=1 / 64)
    assert r.caps[1] == 0 and r.caps[0] > 0 and r.caps[0] <= 8192


def test_fill_shares_the_jump_remainder_up_to_the_peak():
    rng = np.random.default_rng(3)
    gains = 0
    for _ in range(50):
        tau, budget = make_instance(rng, scarcity=0.3)
        plain = clear_market(tau, budget, fill_unused=False)
        filled = clear_market(tau, budget, fill_unused=True)
        np.testing.assert_array_equal(plain.active, filled.active)
        assert (filled.caps >= plain.caps).all() and filled.caps.sum() <= budget
        peak = np.floor(tau + 1 / filled.beta)
        assert (filled.caps[filled.active] <= peak[filled.active] + 1).all()
        gains += filled.caps.sum() > plain.caps.sum()
    assert gains > 0  # the switch does something


# ---------------------------------------------------------------- optimal


def _water_fill_utility(curve, tau, subset, budget, t_max):
    """Best total utility of an active set: water-fill a common slack (independent code)."""
    t = tau[list(subset)]
    rest = budget - t.sum()
    if rest <= 0:
        return 0.0
    room = np.minimum(curve.peak_slack, t_max - t)
    if (room <= 0).any():
        return -math.inf  # a member cannot even reach its threshold
    lo, hi = 0.0, curve.peak_slack
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(mid, room).sum() > rest:
            hi = mid
        else:
            lo = mid
    return float(curve.gain(np.minimum(lo, room)).sum())


def _total_utility(curve, tau, r, t_max):
    x = np.minimum(r.slack_tokens, t_max - tau[r.active])
    return float(curve.gain(x).sum())


@pytest.mark.parametrize("utility", UTILITIES)
@pytest.mark.parametrize("context_limit_tokens", [None, 900])
def test_optimal_equals_brute_force_over_all_active_sets(utility, context_limit_tokens):
    rng = np.random.default_rng(11)
    t_max = math.inf if context_limit_tokens is None else context_limit_tokens
    for _ in range(60):
        n = int(rng.integers(1, 7))
        tau = rng.uniform(0, 800, n)
        budget = float(rng.uniform(0.1, 1.5) * (tau.sum() + n * 100))
        beta = float(rng.choice([1 / 25, 1 / 100, 1 / 400]))
        curve = make_utility(utility, 2.0, beta)
        best = max(
            (_water_fill_utility(curve, tau, s, budget, t_max)
             for k in range(n + 1) for s in itertools.combinations(range(n), k)),
            default=0.0,
        )
        r = clear_market(tau, budget, beta=beta, method="optimal", utility=utility, context_limit_tokens=context_limit_tokens)
        assert_allclose(_total_utility(curve, tau, r, t_max), max(best, 0.0), rtol=1e-9, atol=1e-9)


def test_optimal_beats_grid_search_on_tiny_instances():
    """No structural assumption: every integer allocation on a grid is no better."""
    rng = np.random.default_rng(5)
    for _ in range(15):
        tau = rng.uniform(0, 60, 3)
        budget = float(rng.uniform(20, 200))
        curve = make_utility("surge", 2.0, 1 / 20)
        grid = np.arange(0, budget + 1, 2.0)
        best = 0.0
        for a in grid:
            for b in grid[grid <= budget - a]:
                c = budget - a - b
                best = max(best, float(curve.value(np.array([a, b, c]), tau).sum()))
        r = clear_market(tau, budget, beta=1 / 20, method="optimal")
        assert _total_utility(curve, tau, r, math.inf) >= best - 1e-9


def test_optimal_is_never_worse_than_clearing_on_the_paper_objective():
    rng = np.random.default_rng(2)
    for _ in range(100):
        tau, budget = make_instance(rng, n=int(rng.integers(2, 50)))
        curve = make_utility("surge", 2.0, 1 / 64)
        opt = clear_market(tau, budget, beta=1 / 64, method="optimal")
        clr = clear_market(tau, budget, beta=1 / 64, method="exact", fill_unused=False)
        assert _total_utility(curve, tau, opt, math.inf) >= _total_utility(curve, tau, clr, math.inf) - 1e-9


# ---------------------------------------------------------------- properties

thresholds_st = st.lists(st.floats(0, 10_000, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    tau=thresholds_st,
    budget=st.floats(0, 500_000),
    context_limit_tokens=st.one_of(st.none(), st.integers(1, 9000)),
    method=st.sampled_from(["exact", "bisection", "optimal"]),
    utility=st.sampled_from(UTILITIES),
    fill=st.booleans(),
)
def test_caps_respect_budget_context_and_abandonment(tau, budget, context_limit_tokens, method, utility, fill):
    r = clear_market(tau, budget, context_limit_tokens=context_limit_tokens, method=method, utility=utility, fill_unused=fill)
    assert r.caps.dtype.kind == "i"
    assert r.caps.sum() <= budget
    if context_limit_tokens is not None:
        assert (r.caps <= context_limit_tokens).all()
    assert (r.caps[~r.active] == 0).all()
    assert (r.caps >= 0).all()


@settings(max_examples=100, deadline=None)
@given(tau=thresholds_st, b1=st.floats(0, 300_000), b2=st.floats(0, 300_000),
       beta=st.sampled_from([1 / 16, 1 / 128, 1 / 1024]), fill=st.booleans())
def test_total_allocation_is_monotone_in_budget_with_fixed_beta(tau, b1, b2, beta, fill):
    lo, hi = sorted((b1, b2))
    a = clear_market(tau, lo, beta=beta, fill_unused=fill)
    b = clear_market(tau, hi, beta=beta, fill_unused=fill)
    assert a.caps.sum() <= b.caps.sum()
    assert a.shadow_price >= b.shadow_price - 1e-12


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(thresholds=[1.0, -3.0], budget=10), r"thresholds\[1\]"),
        (dict(thresholds=[1.0, float("nan")], budget=10), r"thresholds\[1\]"),
        (dict(thresholds=[1.0], budget=-1), "budget"),
        (dict(thresholds=[1.0], budget=float("inf")), "budget"),
        (dict(thresholds=[1.0], budget=10, alpha=0.0), "alpha"),
        (dict(thresholds=[1.0], budget=10, alpha=-2.0), "alpha"),
        (dict(thresholds=[1.0], budget=10, beta=0.0), "beta"),
        (dict(thresholds=[1.0], budget=10, context_limit_tokens=0), "context_limit_tokens"),
        (dict(thresholds=[1.0], budget=10, method="newton"), "method"),
        (dict(thresholds=[[1.0]], budget=10), "thresholds"),
    ],
)
def test_invalid_input_raises_a_typed_error_naming_the_value(kwargs, name):
    with pytest.raises(InvalidInputError, match=name):
        clear_market(**kwargs)
