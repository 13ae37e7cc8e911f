"""The token ledger, synchronously: the budget invariant under any command sequence."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from clear_core.errors import BudgetExhaustedError, InvalidInputError, UnknownReservationError
from clear_core.budget import make_budget
from clear_core.ledger import TokenLedger
from tests.factories import FakeClock


def make_ledger(mode="per_query", **kw):
    clock = FakeClock()
    if mode == "per_query":
        budget = make_budget(mode="per_query", tokens_per_query=kw.pop("b", 100.0), window_queries=kw.pop("w", 10), **kw)
    else:
        budget = make_budget(mode="rate", tokens_per_s=kw.pop("rate", 100.0), burst_tokens=kw.pop("burst", 1000.0), **kw)
    return TokenLedger(budget, clock=clock), clock


def test_per_query_block_credit():
    led, _ = make_ledger(b=100.0, w=10)
    assert led.available() == 0
    led.arrive()
    assert led.state().granted == 1000  # first arrival credits the whole block
    for _ in range(9):
        led.arrive()
    assert led.state().granted == 1000
    led.arrive()  # 11th arrival opens the second block
    assert led.state().granted == 2000
    assert led.budget.remaining_in_block(led.arrivals) == 10


def test_reserve_refuses_beyond_available():
    led, _ = make_ledger(b=100.0, w=2)
    led.arrive()
    led.reserve("a", 150)
    with pytest.raises(BudgetExhaustedError):
        led.reserve("b", 51)
    led.reserve("b", 50)
    st_ = led.state()
    assert (st_.reserved, st_.available, st_.in_flight) == (200, 0, 2)


def test_settle_charges_cap_without_refund_and_generated_with():
    led, _ = make_ledger(b=100.0, w=1)
    led.arrive()
    led.reserve("a", 80)
    s = led.settle("a", 30)
    assert (s.generated, s.refunded, s.charged) == (30, 50, 80)  # per-query default counts caps
    assert led.available() == 20
    led2, _ = make_ledger(b=100.0, w=1, refund_unused=True)
    led2.arrive()
    led2.reserve("a", 80)
    assert led2.settle("a", 30).charged == 30
    assert led2.available() == 70


def test_settle_twice_and_unknown_raise():
    led, _ = make_ledger()
    led.arrive()
    led.reserve("a", 10)
    led.settle("a", 10)
    with pytest.raises(UnknownReservationError):
        led.settle("a", 10)
    with pytest.raises(InvalidInputError):
        led.reserve("x", -1)


def test_generated_is_clipped_to_the_cap():
    led, _ = make_ledger()
    led.arrive()
    led.reserve("a", 10)
    s = led.settle("a", 10_000)
    assert (s.generated, s.refunded) == (10, 0)


def test_rate_bucket_refills_up_to_burst():
    led, clock = make_ledger("rate", rate=100.0, burst=1000.0)
    assert led.available() == 1000
    led.reserve("a", 1000)
    assert led.available() == 0
    clock.t = 2.0
    assert led.available() == 0  # lent-out tokens still count against the capacity
    led.settle("a", 1000)  # ... until they are spent
    clock.t = 4.0
    assert led.available() == 200
    clock.t = 100.0
    assert led.available() == 1000  # never above the bucket capacity
    assert led.seconds_until(1000) == 0.0


def test_rate_refund_returns_tokens():
    led, clock = make_ledger("rate", rate=0.0, burst=500.0)
    led.reserve("a", 400)
    led.settle("a", 100)
    assert led.available() == 400
    assert led.seconds_until(600) == math.inf


def test_expiry_charges_in_full():
    led, clock = make_ledger("rate", rate=0.0, burst=500.0, reservation_ttl_s=10.0)
    led.reserve("a", 100)
    clock.t = 5.0
    led.reserve("b", 100)
    clock.t = 11.0
    assert led.expire() == ["a"]
    s = led.state()
    assert (s.reserved, s.spent, s.in_flight, s.expired_total) == (100, 100, 1, 1)
    with pytest.raises(UnknownReservationError):
        led.settle("a", 5)


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve / settle / arrive / tick / expire never break reserved + spent <= granted."""

    reservations = Bundle("reservations")

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.ledger = None
        self.n = 0
        self.model_reserved = {}

    @rule(target=reservations, cap=st.integers(0, 3000))
    def reserve(self, cap):
        if self.ledger is None:
            return None
        rid = f"r{self.n}"
        self.n += 1
        before = self.ledger.available()
        try:
            self.ledger.reserve(rid, cap)
        except BudgetExhaustedError:
            assert cap > before
            return None
        assert cap <= before
        self.model_reserved[rid] = cap
        return rid

    @rule(rid=consumes(reservations), frac=st.floats(0, 1.5))
    def settle(self, rid, frac):
        if rid is None:
            return
        if rid not in self.model_reserved:  # expired meanwhile: a late settle is refused
            with pytest.raises(UnknownReservationError):
                self.ledger.settle(rid, 0)
            return
        cap = self.model_reserved.pop(rid)  # the model dropped it if it expired
        s = self.ledger.settle(rid, int(cap * frac))
        assert s.generated + s.refunded == cap

    @rule()
    def arrive(self):
        if self.ledger is not None:
            self.ledger.arrive()

    @rule(dt=st.floats(0, 5))
    def tick(self, dt):
        self.clock.t += dt

    @rule()
    def expire(self):
        if self.ledger is not None:
            for rid in self.ledger.expire():
                self.model_reserved.pop(rid, None)

    @initialize(
        mode=st.sampled_from(["per_query", "rate"]),
        refund=st.sampled_from([None, True, False]),
        b=st.floats(0, 2000),
        w=st.integers(1, 20),
        rate=st.floats(0, 500),
        burst=st.floats(1, 5000),  # a bucket with neither rate nor burst is refused
    )
    def init(self, mode, refund, b, w, rate, burst):
        if mode == "per_query":
            budget = make_budget(mode=mode, tokens_per_query=b, window_queries=w, refund_unused=refund, reservation_ttl_s=20)
        else:
            budget = make_budget(mode=mode, tokens_per_s=rate, burst_tokens=burst, refund_unused=refund, reservation_ttl_s=20)
        self.ledger = TokenLedger(budget, clock=self.clock)

    @invariant()
    def budget_invariant(self):
        if self.ledger is None:
            return
        s = self.ledger.state()
        assert s.reserved + s.spent <= s.granted + 1e-6
        assert s.available >= 0
        assert s.reserved == sum(self.model_reserved.values())
        assert s.generated_total + s.refunded_total <= s.allocated_total
        assert s.in_flight == len(self.model_reserved)
        if self.ledger.budget.mode == "rate":
            assert s.available + s.reserved <= self.ledger.budget.burst_tokens + 1e-6


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(
    caps=st.lists(st.integers(0, 2000), min_size=1, max_size=80),
    gen=st.lists(st.floats(0, 1), min_size=80, max_size=80),
    b=st.integers(1, 1000),
)
def test_all_released_after_settling_everything(caps, gen, b):
    led, _ = make_ledger(b=float(b), w=len(caps), refund_unused=True)
    admitted = []
    for i, c in enumerate(caps):
        led.arrive()
        try:
            led.reserve(str(i), c)
            admitted.append((str(i), c))
        except BudgetExhaustedError:
            pass
    for (rid, c), f in zip(admitted, gen):
        led.settle(rid, int(c * f))
    s = led.state()
    assert s.reserved == 0 and s.in_flight == 0
    assert s.spent == s.generated_total
    assert s.allocated_total == s.generated_total + s.refunded_total
    assert s.spent <= b * len(caps)
