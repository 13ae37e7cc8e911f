"""The books survive an allocator restart: snapshot -> restore, pure and through the Allocator."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.errors import BudgetExhaustedError, InvalidInputError
from clear_core.ledger import BudgetSpec, TokenLedger
from deployments.allocator import Allocator
from deployments.state_store import MemoryStateStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _books(led):
    st_ = led.state()
    return (st_.granted, st_.reserved, st_.spent, st_.in_flight, st_.allocated_total, st_.generated_total,
            st_.refunded_total, st_.expired_total, st_.arrivals)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["arrive_reserve", "settle", "expire", "tick"]),
                              st.integers(0, 3000)), max_size=60),
       mode=st.sampled_from(["per_query", "rate"]))
def test_restore_reproduces_the_books_and_keeps_the_invariant(ops, mode):
    spec = BudgetSpec(mode=mode, tokens_per_query=300, window_queries=7, tokens_per_s=500, burst_tokens=4000,
                      reservation_ttl_s=30)
    clock = Clock()
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
    clock2 = Clock()
    clock2.t = 5.0  # another process: another clock origin
    back = TokenLedger.restore(snap, clock2)
    assert _books(back)[:3] == _books(led)[:3] and _books(back)[3:] == _books(led)[3:]
    assert back.state().invariant_holds
    assert back.available() <= led.available()  # a restart never loosens the budget
    for rid in open_ids:  # requests in flight at the crash can still settle
        back.settle(rid, 1)
    assert back.state().reserved == 0 and back.state().invariant_holds


def test_restore_refuses_broken_books():
    led = TokenLedger(BudgetSpec(tokens_per_query=10, window_queries=1))
    snap = led.snapshot()
    snap["spent"] = 50
    with pytest.raises(InvalidInputError, match="snapshot"):
        TokenLedger.restore(snap)


def _allocator(store, **budget):
    cfg = {"policy": "clear", "budget": {"mode": "per_query", "tokens_per_query": 400, "window_queries": 50, **budget}}
    return Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)


def test_a_restarted_allocator_keeps_its_books_and_pricing_window():
    store = MemoryStateStore()
    a = _allocator(store)
    rng = random.Random(0)
    admitted = []
    for i in range(40):
        d = a.reserve_sync(f"q{i}", rng.lognormvariate(6, 1), log_sigma=0.5)
        if d["admitted"]:
            admitted.append((f"q{i}", d["cap"]))
    for rid, cap in admitted[:10]:
        a.settle_sync(rid, cap // 2)
    before = a.status_sync()
    b = _allocator(store)  # Serve restarted the replica: same key, same spec
    after = b.status_sync()
    assert after["restored_after_restart"] is True
    for key in ("granted_tokens", "spent_tokens", "reserved_tokens", "in_flight_reservations", "arrivals",
                "allocated_tokens_total", "generated_tokens_total", "refunded_tokens_total"):
        assert after[key] == before[key], key
    assert after["pricing_window_filled"] == before["pricing_window_filled"] == 40
    for rid, cap in admitted[10:]:  # in-flight requests settle against the new replica
        assert b.settle_sync(rid, cap) is not None
    final = b.status_sync()
    assert final["reserved_tokens"] == 0 and final["invariant_holds"]
    # Over the 50-query block, caps never exceed what the block granted.
    assert final["spent_tokens"] <= final["granted_tokens"] == 50 * 400


def test_a_new_budget_spec_starts_fresh_books():
    store = MemoryStateStore()
    a = _allocator(store)
    a.reserve_sync("q0", 300.0)
    b = _allocator(store, tokens_per_query=999)
    assert b.status_sync()["restored_after_restart"] is False and b.status_sync()["arrivals"] == 0


def test_a_seeded_window_prices_the_first_request_like_a_warm_one(tmp_path):
    """A cold allocator with a seed decides the first request as a warm one with that window would."""
    rng = random.Random(5)
    seed = [rng.lognormvariate(6.5, 1.0) for _ in range(256)]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(f'{{"id": "p{i}", "threshold_tokens": {t}}}\n' for i, t in enumerate(seed)))
    base = {"policy": "clear", "pricing_window_requests": 256, "pace_budget": False,
            "budget": {"mode": "per_query", "tokens_per_query": 300, "window_queries": 1000}}
    seeded = Allocator({**base, "pricing_window_seed_path": str(path)}, max_completion_tokens=8192, metrics=False)
    cold = Allocator(base, max_completion_tokens=8192, metrics=False)
    warm = Allocator(base, max_completion_tokens=8192, metrics=False)
    warm.market.restore({"window": seed})
    differs = 0
    for i, tau in enumerate((60.0, 150.0, 400.0, 900.0, 2500.0)):
        a, b, c = (x.reserve_sync(f"q{i}", tau, log_sigma=0.5) for x in (seeded, cold, warm))
        assert (a["admitted"], a["cap"], a["shadow_price"]) == (c["admitted"], c["cap"], c["shadow_price"])
        differs += (a["cap"], a["shadow_price"]) != (b["cap"], b["shadow_price"])
    assert differs >= 3  # priced alone, the first requests would have seen another market
    assert seeded.status_sync()["pricing_window_filled"] == 256  # the window keeps its size


def test_bad_seed_file(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(InvalidInputError, match="seed.jsonl:1"):
        Allocator({"pricing_window_seed_path": str(path)}, metrics=False)
