"""Faults never charge for tokens nobody received: failed settles, owner leases, idempotent settles,
retried arrivals, and the retry advice of an abandonment."""

from __future__ import annotations

import random

import pytest

from clear_core.budget import make_budget
from clear_core.errors import UnknownReservationError
from clear_core.ledger import TokenLedger
from clear_core.online_market import MAX_RETRY_AFTER_S, DecisionReason, OnlineMarket
from clear_core.policies import get_policy
from tests.factories import FakeClock


def per_query_ledger(b=100.0, w=10, lease_ttl_s=15.0):
    clock = FakeClock()
    budget = make_budget(mode="per_query", tokens_per_query=b, window_queries=w)
    return TokenLedger(budget, clock=clock, lease_ttl_s=lease_ttl_s), clock


def test_a_failed_request_is_charged_only_what_it_generated_even_without_refunds():
    led, _ = per_query_ledger(b=100.0, w=1)
    led.arrive()
    led.reserve("ok", 40)
    led.reserve("bad", 50)
    assert led.settle("ok", 10).charged == 40  # per-query mode counts whole caps...
    s = led.settle("bad", 7, failed=True)
    assert (s.generated, s.refunded, s.charged) == (7, 43, 7)  # ...but a failure pays only what it generated
    st = led.state()
    assert st.spent == 47 and st.available == 100 - 47 and st.failed_total == 1 and st.reconciles


def test_a_lapsed_lease_recovers_its_reservations_at_no_charge():
    led, clock = per_query_ledger(b=1000.0, w=1, lease_ttl_s=10.0)
    led.arrive()
    led.reserve("a1", 100, owner="ingress-a")
    led.reserve("a2", 200, owner="ingress-a")
    led.reserve("b1", 300, owner="ingress-b")
    led.reserve("n1", 50)  # no owner: only the TTL ends it
    clock.t += 6.0
    assert led.renew("ingress-b") == 1
    clock.t += 4.0  # a: 10 s since its last renewal; b: 4 s
    gone = led.release_lapsed()
    assert sorted(gone) == [("a1", 100), ("a2", 200)]
    st = led.state()
    assert (st.reserved, st.spent, st.available) == (350, 0, 650)
    assert (st.recovered_total, st.recovered_tokens_total, st.refunded_total) == (2, 300, 300)
    assert st.owners == 1 and st.reconciles and st.invariant_holds
    assert led.release_lapsed() == []  # b renewed 4 s ago
    assert led.state() == st


def test_settling_twice_changes_nothing_the_second_time():
    led, _ = per_query_ledger(b=100.0, w=1)
    led.arrive()
    led.reserve("r", 60)
    led.settle("r", 20)
    before = led.state()
    with pytest.raises(UnknownReservationError):
        led.settle("r", 60)
    with pytest.raises(UnknownReservationError):
        led.settle("never-reserved", 0, failed=True)
    assert led.state() == before


def test_books_reconcile_under_random_faults_against_an_independent_tally():
    """Reserve / settle / fail / recover / expire at random; every allocated token ends somewhere."""
    rng = random.Random(7)
    clock = FakeClock()
    budget = make_budget(mode="rate", tokens_per_s=500.0, burst_tokens=20_000.0, reservation_ttl_s=60.0)
    led = TokenLedger(budget, clock=clock, lease_ttl_s=5.0)
    owners = ["i0", "i1", "i2"]
    alive = set(owners)
    open_: dict[str, tuple[int, str | None]] = {}
    generated = refunded = expired_tokens = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.45:
            cap = rng.randint(1, 400)
            owner = rng.choice(owners + [None])
            if cap <= led.available() and (owner is None or owner in alive):
                led.reserve(f"r{step}", cap, owner=owner)
                open_[f"r{step}"] = (cap, owner)
        elif op < 0.8 and open_:
            rid = rng.choice(sorted(open_))
            cap, _ = open_.pop(rid)
            g = rng.randint(0, cap + 50)
            s = led.settle(rid, g, failed=rng.random() < 0.3)
            generated += min(g, cap)
            refunded += cap - min(g, cap)
            assert s.generated == min(g, cap)
        elif op < 0.85:
            victim = rng.choice(owners)
            alive.discard(victim)  # this owner stops renewing
        elif op < 0.9:
            alive = set(owners)
        for o in alive:
            led.renew(o)
        clock.t += rng.uniform(0.0, 1.5)
        for rid, cap in led.release_lapsed():
            assert open_.pop(rid)[1] not in alive
            refunded += cap
        for rid in led.expire():
            expired_tokens += open_.pop(rid)[0]
        st = led.state()
        assert st.invariant_holds and st.reconciles
        assert (st.generated_total, st.refunded_total, st.expired_tokens_total) == (generated, refunded, expired_tokens)
        assert st.reserved == sum(c for c, _ in open_.values())
    assert st.recovered_total > 0 and st.failed_total > 0  # the run exercised the fault paths


def test_snapshot_keeps_owners_and_fault_counters():
    led, clock = per_query_ledger(b=1000.0, w=1, lease_ttl_s=10.0)
    led.arrive()
    led.reserve("a", 100, owner="ingress-a")
    led.reserve("b", 100)
    led.settle("b", 30, failed=True)
    clock.t += 20.0
    back = TokenLedger.restore(led.snapshot(), clock=clock)
    assert back.state() == led.state() or back.state().owners == 1
    # the restored owner gets a fresh lease: nothing is recovered until it lapses again
    assert back.release_lapsed() == []
    clock.t += 10.0
    assert back.release_lapsed() == [("a", 100)]
    assert back.state().failed_total == 1 and back.state().reconciles


# -- the market: retries are not new demand; abandonments say whether to retry ---------------------


def make_market(mode="per_query", window=16, **kw):
    clock = FakeClock()
    if mode == "per_query":
        budget = make_budget(mode="per_query", tokens_per_query=kw.pop("b", 256.0), window_queries=kw.pop("w", 100))
    else:
        budget = make_budget(mode="rate", **kw)
    ledger = TokenLedger(budget, clock=clock)
    return OnlineMarket(get_policy("clear"), ledger, window_size=window, context_limit_tokens=8192, pace=False), clock


def test_a_retry_is_the_same_arrival_for_the_market_and_the_budget():
    m, clock = make_market(b=256.0, w=1)  # one query per block: every new arrival credits 256 tokens
    for i in range(16):
        m.request(f"w{i}", 150.0)
        clock.t += 1.0
    d = m.request("hard-1", 50_000.0, arrival_key="k", retry=False)
    assert d.reason is DecisionReason.INSOLVENT and d.new_arrival
    state, window, rate = m.ledger.state(), list(m.window()), m.abandonment_rate()
    for attempt in range(2, 5):
        again = m.request(f"hard-{attempt}", 50_000.0, arrival_key="k", retry=True)
        assert not again.new_arrival and again.reason is DecisionReason.INSOLVENT
    assert m.ledger.state().arrivals == state.arrivals and m.ledger.state().granted == state.granted
    assert list(m.window()) == window and m.abandonment_rate() == rate
    # the same body sent afresh (not a retry) is new demand; so is a retry of a key never seen
    assert m.request("fresh", 50_000.0, arrival_key="k", retry=False).new_arrival
    assert m.request("stranger", 50_000.0, arrival_key="other", retry=True).new_arrival
    assert m.ledger.state().arrivals == state.arrivals + 2


def test_an_insolvent_request_is_told_not_to_retry_until_the_window_turns_over():
    m, clock = make_market(b=256.0, window=16)
    for i in range(16):
        m.request(f"w{i}", 150.0)
        clock.t += 0.5  # 2 arrivals per second
    d = m.request("hard", 50_000.0)
    assert d.reason is DecisionReason.INSOLVENT and not d.should_retry
    # 16 window thresholds; the last 16 arrival times span 7.5 s: turnover = 16 / (16 / 7.5) s
    assert d.retry_after_s == pytest.approx(7.5)


def test_a_drained_bucket_says_retry_after_the_refill():
    clock = FakeClock()
    ledger = TokenLedger(make_budget(mode="rate", tokens_per_s=100.0, burst_tokens=1000.0), clock=clock)
    # priced at 100 tok/s over a 10 s span: b = 1000 per query
    m = OnlineMarket(get_policy("clear"), ledger, window_size=0, context_limit_tokens=8192, min_rate_span_s=10.0)
    first = m.request("a", 600.0)
    assert first.admitted and ledger.available() == 1000 - first.cap_tokens
    left = ledger.available()
    d = m.request("b", 300.0)
    assert d.reason is DecisionReason.POOL_EMPTY and d.should_retry
    assert d.retry_after_s == pytest.approx(max(1.0, (300 - left) / 100.0))
    # a per-query pool is credited only by arrivals: no refill will cover it, so no retry advice
    pq = OnlineMarket(get_policy("uniform"), TokenLedger(make_budget(mode="per_query", tokens_per_query=100.0,
                                                                     window_queries=10), clock=FakeClock()), pace=False)
    assert pq.request("x", 90.0).cap_tokens == 100
    pq.ledger.reserve("hold", pq.ledger.available())  # drain the block
    empty = pq.request("y", 95.0)
    assert empty.reason is DecisionReason.POOL_EMPTY and not empty.should_retry
    assert empty.retry_after_s == MAX_RETRY_AFTER_S


# -- a settle that arrives after its owner's lease lapsed ----------------------------------------------


def test_a_settle_after_the_lease_lapsed_charges_what_the_client_received():
    """The owner was cut off longer than the lease TTL, not dead: its reservation was recovered (the cap back
    to the pool, charged nothing), and then its settle arrives. The tokens its client received are charged."""
    led, clock = per_query_ledger(b=1000.0, w=1, lease_ttl_s=10.0)
    led.arrive()  # 1,000 in the pool
    led.reserve("a", 300, owner="stalled")
    clock.t += 11.0
    assert led.release_lapsed() == [("a", 300)]
    st = led.state()
    assert (st.spent, st.reserved, st.recovered_tokens_total, st.available) == (0, 0, 300, 1000)
    s = led.settle("a", 120)
    assert (s.cap, s.generated, s.charged, s.refunded) == (300, 120, 120, 180)
    st = led.state()
    assert st.spent == 120 and st.generated_total == 120 and st.refunded_total == 180
    assert st.recovered_tokens_total == 180 and st.late_charged_tokens_total == 120
    assert st.invariant_holds and st.reconciles and st.available == 880
    with pytest.raises(UnknownReservationError):  # once: a second settle changes nothing
        led.settle("a", 120)
    assert led.state() == st


def test_a_late_settle_never_breaks_the_invariant_when_the_pool_was_spent_meanwhile():
    led, clock = per_query_ledger(b=1000.0, w=1, lease_ttl_s=10.0)
    led.arrive()
    led.reserve("a", 300, owner="stalled")
    clock.t += 11.0
    led.release_lapsed()
    led.reserve("b", 950)  # the recovered cap was lent again: 50 left
    s = led.settle("a", 200)
    st = led.state()
    assert s.charged == 50 and st.spent == 50 and st.late_uncharged_tokens_total == 150
    assert st.invariant_holds and st.reconciles and st.available == 0


def test_recovered_reservations_are_remembered_across_a_snapshot():
    led, clock = per_query_ledger(b=1000.0, w=1, lease_ttl_s=10.0)
    led.arrive()
    led.reserve("a", 300, owner="stalled")
    clock.t += 11.0
    led.release_lapsed()
    back = TokenLedger.restore(led.snapshot(), clock=clock)
    assert back.settle("a", 40).charged == 40 and back.state().spent == 40 and back.state().reconciles


# -- a client that left while its answer waited for the settle's acknowledgement ---------------------------


@pytest.mark.parametrize("refund", [False, True])
def test_a_correction_charges_only_what_the_client_received(refund):
    led = TokenLedger(make_budget(mode="per_query", tokens_per_query=1000, window_queries=1, refund_unused=refund))
    led.arrive()
    led.reserve("a", 300)
    s = led.settle("a", 120)
    assert s.charged == (120 if refund else 300)
    before = led.state()
    c = led.correct("a", 0)  # it received none of it
    st = led.state()
    assert (c.cap, c.generated, c.charged, c.refunded) == (300, 0, 0, 300)
    assert st.spent == before.spent - s.charged == 0 and st.available == 1000
    assert st.generated_total == 0 and st.refunded_total == 300 and st.corrected_tokens_total == s.charged
    assert st.failed_total == 1 and st.invariant_holds and st.reconciles
    assert led.correct("a", 0) is None and led.state() == st  # once


def test_a_correction_never_raises_a_charge_and_forgets_old_settles():
    clock = FakeClock()
    led = TokenLedger(make_budget(mode="per_query", tokens_per_query=1000, window_queries=1, refund_unused=True),
                      clock=clock)
    led.arrive()
    led.reserve("a", 300)
    led.settle("a", 100)
    st = led.state()
    assert led.correct("a", 250).charged == 100 and led.state() == st  # received more than it was charged: no change
    led.reserve("b", 300)
    led.settle("b", 100)
    clock.t += 61.0
    assert led.correct("b", 0) is None and led.state().spent == 200  # too old to correct
    assert led.correct("never-made", 0) is None


def test_a_report_from_a_revoked_owner_charges_what_it_charged_since_its_last_report():
    """Decisions at the ingress: a replica cut off for longer than the lease TTL is revoked (its lease back to
    the pool). Its next report still says what its clients received since the last one: that is charged."""
    led, clock = per_query_ledger(b=10_000.0, w=1, lease_ttl_s=10.0)
    led.arrive()
    assert led.grant_lease("ing", 2000) == 2000
    counters = {"charged": 300, "returned": 0, "allocated": 500, "generated": 300, "refunded": 0, "failed": 0}
    led.reconcile("ing", counters, reserved=200)
    clock.t += 11.0
    led.release_lapsed()
    st = led.state()
    assert led.is_revoked("ing") and st.leased == 0 and st.spent == 300 and st.recovered_tokens_total == 200
    assert st.reconciles
    # Since its last report: the 200 tokens of caps then open settled (150 generated, 50 refunded), and it
    # reserved 200 more, still open.
    late = {"charged": 450, "returned": 0, "allocated": 700, "generated": 450, "refunded": 50, "failed": 0}
    assert led.late_report("ing", late, reserved=200) == 150
    st = led.state()
    assert st.spent == 450 and st.late_charged_tokens_total == 150 and st.allocated_total == 700
    assert st.generated_total == 450 and st.refunded_total == 250 and st.recovered_tokens_total == 200
    assert st.invariant_holds and st.reconciles
    assert led.late_report("ing", late, reserved=200) == 0 and led.state() == st  # repeated: nothing twice
    back = TokenLedger.restore(led.snapshot(), clock=clock)  # the revoked lease's counters survive a restart
    more = {**late, "charged": 500, "generated": 500, "allocated": 700, "refunded": 50}
    assert back.late_report("ing", more, reserved=150) == 50 and back.state().reconciles
