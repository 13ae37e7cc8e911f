"""The books survive a restart: snapshot -> restore of the pure ledger."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.budget import make_budget
from clear_core.errors import BudgetExhaustedError, InvalidInputError
from clear_core.ledger import TokenLedger
from tests.factories import FakeClock


def _books(led):
    st_ = led.state()
    return (st_.granted, st_.reserved, st_.spent, st_.in_flight, st_.allocated_total, st_.generated_total,
            st_.refunded_total, st_.expired_total, st_.arrivals)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["arrive_reserve", "settle", "expire", "tick"]),
                              st.integers(0, 3000)), max_size=60),
       mode=st.sampled_from(["per_query", "rate"]))
def test_restore_reproduces_the_books_and_keeps_the_invariant(ops, mode):
    fields = dict(tokens_per_query=300, window_queries=7) if mode == "per_query" else dict(
        tokens_per_s=500, burst_tokens=4000)
    spec = make_budget(mode=mode, reservation_ttl_s=30, **fields)
    clock = FakeClock(1000.0)
    led = TokenLedger(spec, clock)
    open_ids, n = [], 0
    for op, x in ops:
        if op == "arrive_reserve":
            led.arrive()
            try:
                led.reserve(f"r{n}", x)
                open_ids.append(f"r{n}")
            except BudgetExhaustedError:
                pass
            n += 1
        elif op == "settle" and open_ids:
            led.settle(open_ids.pop(x % len(open_ids)), x)
        elif op == "expire":
            gone = led.expire()
            open_ids = [r for r in open_ids if r not in gone]
        else:
            clock.t += x / 100
    snap = led.snapshot()
    clock2 = FakeClock(1000.0)
    clock2.t = 5.0  # another process: another clock origin
    back = TokenLedger.restore(snap, clock2)
    assert _books(back)[:3] == _books(led)[:3] and _books(back)[3:] == _books(led)[3:]
    assert back.state().invariant_holds
    assert back.available() <= led.available()  # a restart never loosens the budget
    for rid in open_ids:  # requests in flight at the crash can still settle
        back.settle(rid, 1)
    assert back.state().reserved == 0 and back.state().invariant_holds


def test_restore_refuses_broken_books():
    led = TokenLedger(make_budget(tokens_per_query=10, window_queries=1))
    snap = led.snapshot()
    snap["spent"] = 50
    with pytest.raises(InvalidInputError, match="snapshot"):
        TokenLedger.restore(snap)
