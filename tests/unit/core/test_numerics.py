"""The shared numerics: monotone bisection against closed forms, integer caps against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.numerics import bisect_monotone, integer_caps


def test_bisection_finds_a_closed_form_boundary_and_reports_convergence():
    # x^3 > 2 is false below 2^(1/3): the boundary is the cube root.
    r = bisect_monotone(lambda x: x**3 < 2.0, 0.0, 2.0, tolerance=1e-12, max_iterations=200)
    assert r.converged and r.lo <= 2 ** (1 / 3) <= r.hi and r.hi - r.lo < 1e-12
    # 2 / 2^k < 1e-12 first at k = 41
    assert r.iterations == math.ceil(math.log2(2.0 / 1e-12))


def test_bisection_says_when_it_did_not_converge():
    r = bisect_monotone(lambda x: x < 0.3, 0.0, 1.0, tolerance=1e-12, max_iterations=5)
    assert not r.converged and r.iterations == 5 and r.lo <= 0.3 <= r.hi and r.hi - r.lo == pytest.approx(1 / 32)


def test_bisection_runs_elementwise_on_arrays():
    targets = np.array([0.1, 0.5, 0.9])
    r = bisect_monotone(lambda x: x < targets, np.zeros(3), np.ones(3), tolerance=1e-10, max_iterations=100)
    assert r.converged and np.all((r.lo <= targets) & (targets <= r.hi)) and np.all(r.hi - r.lo < 1e-10)


def _brute_force_fill(real, budget, limit):
    """Give the remainder one token at a time to the largest fraction with room (index order on ties)."""
    caps = [max(int(math.floor(x + 1e-9)), 0) for x in real]
    left = int(math.floor(budget + 1e-9)) - sum(caps)
    frac = [x - math.floor(x + 1e-9) for x in real]
    while left > 0:
        gave = False
        for i in sorted(range(len(real)), key=lambda i: (-frac[i], i)):
            if left == 0:
                break
            if real[i] > 0 and caps[i] + 1 <= limit[i]:
                caps[i] += 1
                left -= 1
                gave = True
        if not gave:
            break
    return caps


@settings(max_examples=200, deadline=None)
@given(
    real=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 50.0)), min_size=0, max_size=7),
    slack=st.floats(0.0, 30.0),
    limit=st.one_of(st.none(), st.integers(1, 60)),
)
def test_integer_caps_against_brute_force(real, slack, limit):
    budget = sum(math.floor(x + 1e-9) for x in real) + slack  # the floors always fit
    caps = integer_caps(real, budget, limit=None if limit is None else float(limit))
    assert caps.sum() <= math.floor(budget + 1e-9) and (caps >= 0).all()
    if limit is None:
        assert caps.tolist() == [max(int(math.floor(x + 1e-9)), 0) for x in real]
    else:
        assert caps.tolist() == _brute_force_fill(real, budget, [limit] * len(real))


def test_integer_caps_take_back_round_off_from_the_largest():
    caps = integer_caps([10.0, 30.0, 20.0], 59.0)  # 60 floored caps for a budget of 59
    assert caps.tolist() == [10, 29, 20]


def test_integer_caps_fill_every_whole_token_when_there_is_room():
    real = np.array([1.5, 2.25, 3.75, 0.0])
    for budget in range(6, 12):
        caps = integer_caps(real, budget, limit=np.inf)
        assert caps.sum() == budget and caps[3] == 0


# -- the other shared steps: integer bisection, flooring, the secant/bisection price search ----------------


@pytest.mark.parametrize("boundary", [1, 2, 7, 500, 999])
def test_bisect_integer_finds_the_first_integer_where_a_predicate_holds(boundary):
    probes = []

    def fits(x):
        probes.append(x)
        return x >= boundary

    from clear_core.numerics import bisect_integer

    assert bisect_integer(fits, 0, 1000) == boundary
    assert len(probes) <= 10  # log2(1000)
    assert bisect_integer(lambda x: x * x > 2000, 0, 1000) == 45  # closed form: ceil(sqrt(2000)) = 45


def test_floor_caps_floors_and_keeps_round_off_from_losing_a_token():
    from clear_core.numerics import floor_caps

    got = floor_caps([0.0, 99.9999999999, 100.4, 2.0 / 3.0 * 3.0, 7.999])
    assert got.dtype == np.int64 and got.tolist() == [0, 100, 100, 2, 7]


@pytest.mark.parametrize("root", [-3.3, 0.0, 1.7, 8.25])
def test_secant_bisect_brackets_the_boundary_of_a_decreasing_step_function(root):
    """excess(x) = floor(10 (root - x)) / 10 + 0.05 is a decreasing step function, positive exactly for
    x <= root: the bracket closes on root within the tolerance."""
    from clear_core.numerics import secant_bisect

    def excess(x):
        return math.floor(10 * (root - x)) / 10 + 0.05

    lo, hi = root - 20.0, root + 20.0
    r = secant_bisect(excess, lo, hi, excess(lo), excess(hi), tolerance=1e-9, max_iterations=200)
    assert r.converged and excess(r.hi) <= 0 < excess(r.lo)
    assert r.hi - r.lo <= 1e-9 and r.lo <= root < r.hi
