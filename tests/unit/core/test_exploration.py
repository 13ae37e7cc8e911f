"""Exploration (clear_core.exploration): would-be-abandoned requests probed at the predicted threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clear_core.budget import PerQueryBudget
from clear_core.errors import InvalidInputError
from clear_core.exploration import Exploration
from clear_core.lease import IngressMarket, answer_report
from clear_core.ledger import TokenLedger
from clear_core.online_market import DecisionReason, OnlineMarket
from clear_core.policies import parse_policy
from tests.factories import FakeClock

T_MAX = 32768
INSOLVENT, EXPLORED = DecisionReason.INSOLVENT, DecisionReason.EXPLORED


def _market(exploration=None, policy="clear", b=300.0):
    """A window market priced tight (pace off) over a pool far larger than any cap (one 300k block)."""
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=b, window_queries=1000, refund_unused=True), FakeClock())
    return OnlineMarket(parse_policy(policy), ledger, window_size=64, context_limit_tokens=T_MAX, pace=False,
                        exploration=exploration)


def _warm(m, lo=80.0, hi=400.0, n=64, seed=0):
    """Admitted short requests, all settled: nothing in flight, the price set by short demand."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = m.request(f"w{i}", float(rng.uniform(lo, hi)))
        if d.admitted:
            m.settle(f"w{i}", min(int(d.cap_tokens * 0.6), 400))
    assert m.ledger.state().reserved == 0


def _expected_probe(threshold, client_cap, group=1, floor=1):
    """The probe cap in closed form: ceil(threshold) within client cap and context, down to a multiple of the
    group, 0 under the floor."""
    c = min(math.ceil(threshold), T_MAX if client_cap is None else client_cap, T_MAX)
    c -= c % group
    return c if c >= max(floor, group) else 0


# -- Exploration.draws ------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.5])
def test_draws_are_deterministic_per_rid_and_binomial_at_the_share(share):
    e, again = Exploration(share, 0.1), Exploration(share, 0.1)
    rids = [f"req-{i}" for i in range(20_000)]
    drawn = np.array([e.draws(r) for r in rids])
    assert all(again.draws(r) == d for r, d in zip(rids[:2000], drawn[:2000]))  # same on every replica
    assert all(e.draws(r) == d for r, d in zip(rids[:2000], drawn[:2000]))  # and on a retry
    se = math.sqrt(share * (1 - share) / len(rids))
    assert abs(drawn.mean() - share) < 3 * se
    wider = Exploration(min(2 * share, 1.0), 0.1)
    assert all(wider.draws(r) for r in np.array(rids)[drawn][:2000])  # one hash: the draws nest


def test_no_share_never_draws_and_full_share_always_does():
    rids = [f"r{i}" for i in range(5000)]
    assert not any(Exploration(0.0, 1.0).draws(r) for r in rids)
    assert not any(Exploration(1.0, 0.0).draws(r) for r in rids)  # no token share: off
    assert all(Exploration(1.0, 0.5).draws(r) for r in rids)


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf, -math.inf, "0.5", None])
@pytest.mark.parametrize("field", ["share", "token_share"])
def test_settings_outside_the_unit_interval_are_refused(field, bad):
    with pytest.raises(InvalidInputError):
        Exploration(**{field: bad})


# -- the online market ------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold, client_cap", [(20_000.0, None), (20_000.4, None), (60_000.0, None),
                                                   (20_000.0, 2501), (9000.5, 4000)])
def test_an_insolvent_request_is_probed_at_its_threshold_and_settled_as_any_reservation(threshold, client_cap):
    plain, m = _market(None), _market(Exploration(1.0, 1.0))
    _warm(plain)
    _warm(m)
    assert plain.request("hard", threshold, client_cap_tokens=client_cap).reason is INSOLVENT
    before = m.ledger.state()
    d = m.request("hard", threshold, client_cap_tokens=client_cap)
    cap = _expected_probe(threshold, client_cap)
    assert (d.reason, d.cap_tokens, d.admitted, d.market_cap_tokens) == (EXPLORED, cap, True, 0)
    held = m.ledger.state()
    assert (held.reserved, held.in_flight, held.available) == (cap, 1, before.available - cap)
    assert held.allocated_total == before.allocated_total + cap
    s = m.settle("hard", cap // 3)
    assert (s.cap, s.generated, s.refunded) == (cap, cap // 3, cap - cap // 3)
    after = m.ledger.state()
    assert after.invariant_holds and after.reconciles and after.reserved == 0
    assert after.spent == before.spent + cap // 3
    assert m.explored.snapshot() == {"probes": 1, "probe_allocated_tokens": cap, "probe_generated_tokens": cap // 3,
                                     "allocated_tokens": before.allocated_total + cap}


def test_probes_hold_at_most_the_token_share_of_what_was_allocated():
    """Each insolvent request is probed exactly when P + c <= share * (A + c), P and A counted here."""
    m = _market(Exploration(1.0, 0.125))  # 1/8: the bound in exact integers, 8 (P + c) <= A + c
    rng = np.random.default_rng(7)
    first = m.request("first", 25_000.0)  # nothing allocated yet: no probe
    assert first.reason is INSOLVENT and m.explored.probes == 0
    alloc = probe = refused = 0
    open_ = []
    for i in range(600):
        long = rng.random() < 0.2
        tau = float(np.exp(rng.uniform(np.log(2000), np.log(40_000)))) if long else float(rng.uniform(80, 400))
        client = int(rng.integers(50, 6000)) if rng.random() < 0.5 else None
        d = m.request(f"q{i}", tau, client_cap_tokens=client)
        if d.market_cap_tokens == 0:  # insolvent
            c = _expected_probe(tau, client)
            assert c <= m.ledger.available()  # the pool never binds here: only the share does
            fits = 8 * (probe + c) <= alloc + c
            assert d.reason is (EXPLORED if fits else INSOLVENT), (i, tau, client, probe, alloc)
            probe += c if fits else 0
            refused += not fits
        if d.admitted:
            alloc += d.cap_tokens
            open_.append((f"q{i}", d.cap_tokens))
        assert 8 * m.explored.probe_allocated_tokens <= m.explored.allocated_tokens
        while len(open_) > 8:
            rid, cap = open_.pop(int(rng.integers(len(open_))))
            m.settle(rid, int(rng.integers(0, cap + 1)))
    assert (m.explored.probe_allocated_tokens, m.explored.allocated_tokens) == (probe, alloc)
    assert m.explored.probes > 5 and refused > 5  # both sides of the bound were reached
    st = m.ledger.state()
    assert st.invariant_holds and st.reconciles


@pytest.mark.parametrize("client_cap, explored", [(500, True), (501, False), (20_000, False)])
def test_a_probe_larger_than_the_pool_is_not_made(client_cap, explored):
    plain, m = _market(None), _market(Exploration(1.0, 1.0))
    for mk in (plain, m):
        _warm(mk)
        mk.ledger.reserve("hog", mk.ledger.available() - 500)
        assert mk.ledger.available() == 500
    d, want = m.request("hard", 20_000.0, client_cap_tokens=client_cap), plain.request(
        "hard", 20_000.0, client_cap_tokens=client_cap)
    if explored:
        assert (d.reason, d.cap_tokens) == (EXPLORED, 500) and m.ledger.available() == 0
    else:
        assert d == want and d.reason is INSOLVENT  # abandoned exactly as without exploration
        assert m.ledger.available() == 500 and m.explored.probes == 0


@pytest.mark.parametrize("client_cap, floor, cap", [(1001, 1, 1000), (1000, 1000, 1000), (1001, 1001, 0),
                                                    (1, 1, 0), (None, 1, T_MAX)])
def test_a_group_probe_is_a_multiple_of_the_group_at_or_above_the_floor(client_cap, floor, cap):
    m = _market(Exploration(1.0, 1.0))
    _warm(m)
    d = m.request("g", 2 * 20_001.0, client_cap_tokens=client_cap, group=2, floor_tokens=floor)
    assert cap == _expected_probe(2 * 20_001.0, client_cap, 2, floor)
    if cap:
        assert (d.reason, d.cap_tokens) == (EXPLORED, cap) and cap % 2 == 0 and cap >= floor
        assert m.ledger.state().reserved == cap
    else:
        assert d.reason is INSOLVENT and m.ledger.state().reserved == 0 and m.explored.probes == 0


# -- decisions at the ingress -----------------------------------------------------------------------


def _ingress(exploration, owner, lease=50_000):
    central = _market(None)
    _warm(central, 200.0, 900.0)  # congested: the quote prices long requests out
    ing = IngressMarket(parse_policy("clear"), owner, True, T_MAX, lease_block_tokens=lease, exploration=exploration)
    ing.apply(answer_report(central, ing.report()))
    assert ing.lease.available == lease
    return central, ing


@pytest.mark.parametrize("threshold, client_cap, group, floor", [(20_000.0, 3001, 1, 1), (20_000.0, None, 1, 1),
                                                                 (20_000.0, 3001, 2, 1), (20_000.0, 3001, 2, 3002)])
def test_the_ingress_probes_an_insolvent_ask_within_its_lease(threshold, client_cap, group, floor):
    _, plain = _ingress(None, "r0")
    central, ing = _ingress(Exploration(1.0, 1.0), "r1")
    kw = dict(log_sigma=0.5, client_cap_tokens=client_cap, group=group, floor_tokens=floor)
    ask = ing.price(threshold, **kw)
    assert ask.cap_tokens == 0 and ing.shortfall(ask) == 0
    assert plain.admit(plain.price(threshold, **kw), "hard").reason is INSOLVENT
    d = ing.admit(ask, "hard")
    cap = _expected_probe(threshold, client_cap, group, floor)
    if not cap:
        assert d.reason is INSOLVENT and ing.lease.available == 50_000 and ing.explored.probes == 0
        return
    assert (d.reason, d.cap_tokens, d.admitted) == (EXPLORED, cap, True)
    assert (ing.lease.available, ing.lease.open_reservations()) == (50_000 - cap, 1)
    s = ing.settle("hard", 777)
    assert (s.generated, s.charged, ing.lease.available) == (777, 777, 50_000 - 777)
    assert ing.explored.snapshot() == {"probes": 1, "probe_allocated_tokens": cap, "probe_generated_tokens": 777,
                                       "allocated_tokens": cap}
    ing.apply(answer_report(central, ing.report()))
    st = central.ledger.state()
    assert st.invariant_holds and st.reconciles


def test_the_ingress_makes_no_probe_larger_than_its_lease():
    _, ing = _ingress(Exploration(1.0, 1.0), "r1", lease=10_000)
    assert ing.admit(ing.price(20_000.0, client_cap_tokens=10_001), "big").reason is INSOLVENT
    d = ing.admit(ing.price(20_000.0, client_cap_tokens=10_000), "fits")
    assert (d.reason, d.cap_tokens, ing.lease.available) == (EXPLORED, 10_000, 0)
