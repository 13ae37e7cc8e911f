"""Groups and floors (clear_core.decision): n choices decided as one, and the least cap worth reserving."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.budget import PerQueryBudget
from clear_core.decision import DecisionReason, fit_to_pool, usable_cap
from clear_core.lease import IngressMarket, answer_report
from clear_core.ledger import TokenLedger
from clear_core.online_market import OnlineMarket
from clear_core.policies import parse_policy

T_MAX = 32768


@settings(deadline=None)
@given(st.integers(0, 5000), st.integers(1, 9), st.integers(1, 600))
def test_usable_cap_is_the_largest_multiple_of_the_group_at_or_above_the_floor(cap, group, floor):
    brute = max((c for c in range(cap + 1) if c % group == 0 and c >= max(floor, group)), default=0)
    assert usable_cap(cap, group, floor) == brute


@given(st.integers(1, 5000), st.integers(0, 5000), st.floats(0, 3000), st.integers(1, 6), st.integers(1, 400))
def test_a_cap_cut_to_the_pool_stays_usable_and_above_threshold_and_floor(cap, available, tau, group, floor):
    cap = usable_cap(cap, group, floor)
    if cap == 0:
        return
    reason, got = fit_to_pool(cap, available, tau, group, floor)
    if reason is DecisionReason.ADMITTED:
        assert got == cap <= available
    elif reason is DecisionReason.CUT_TO_AVAILABLE:
        assert got <= available and got % group == 0 and got >= max(math.ceil(tau), floor, 1)
        assert got + group > available  # the most of the pool a group can use
    else:
        assert got == 0
        best = available - available % group
        assert best < max(math.ceil(tau), floor, group, 1)


def _market(b=400.0, window=64, policy="clear"):
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=b, window_queries=1000, refund_unused=True), lambda: 0.0)
    return OnlineMarket(parse_policy(policy), ledger, window_size=window, context_limit_tokens=T_MAX, pace=False)


def _warm(m, n=64, seed=0, used=0.6):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = m.request(f"w{i}", float(rng.uniform(80, 400)))
        if d.admitted:
            m.settle(f"w{i}", min(int(d.cap_tokens * used), 400))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_group_reserves_a_multiple_of_its_size_and_settles_what_all_choices_generated(n):
    m = _market()
    _warm(m)
    before = m.ledger.state()
    d = m.request("g", n * 150.0, client_cap_tokens=n * 1000, group=n)
    assert d.admitted and d.cap_tokens % n == 0 and d.cap_tokens <= d.market_cap_tokens
    assert m.ledger.state().in_flight == before.in_flight + 1
    s = m.settle("g", 7 * n)  # what the n choices generated together
    assert (s.cap, s.generated, s.refunded) == (d.cap_tokens, 7 * n, d.cap_tokens - 7 * n)
    after = m.ledger.state()
    assert after.invariant_holds and after.reconciles


def test_an_insolvent_group_is_abandoned_whole_where_one_choice_would_be_admitted():
    """A group pays n times what one choice pays: at the same price its entry needs n times the tokens."""
    one, many = _market(b=300.0), _market(b=300.0)
    _warm(one)
    _warm(many)
    assert one.request("single", 600.0).admitted
    d = many.request("group", 8 * 600.0, client_cap_tokens=8 * 4000, group=8)
    assert not d.admitted and d.reason is DecisionReason.INSOLVENT and d.cap_tokens == 0
    assert many.ledger.state().in_flight == 0


def test_a_market_cap_below_the_floor_is_insolvent_and_reserves_nothing():
    m = _market()
    _warm(m)
    held = m.ledger.state().in_flight
    d = m.request("structured", 150.0, floor_tokens=100_000)
    assert not d.admitted and d.reason is DecisionReason.INSOLVENT and 0 < d.market_cap_tokens < 100_000
    assert m.ledger.state().in_flight == held
    ok = m.request("structured-ok", 150.0, floor_tokens=100)
    assert ok.admitted and ok.cap_tokens >= 100


def test_decisions_at_the_ingress_keep_groups_and_floors():
    market = _market(b=500.0, policy="clear-cost")
    _warm(market)
    ing = IngressMarket(parse_policy("clear-cost"), "r0", True, T_MAX, lease_block_tokens=50_000)
    ing.apply(answer_report(market, ing.report()))
    ask = ing.price(3 * 200.0, log_sigma=0.5, client_cap_tokens=3 * 333, group=3)
    if ing.shortfall(ask):
        ing.apply(answer_report(market, ing.report(extra_tokens=ing.shortfall(ask))))
    d = ing.admit(ask, "g")
    assert d.admitted and d.cap_tokens % 3 == 0 and d.cap_tokens <= 999
    floor_ask = ing.price(200.0, log_sigma=0.5, floor_tokens=ask.market_cap_tokens + 1)
    assert not ing.admit(floor_ask, "f").admitted and ing.shortfall(floor_ask) == 0
