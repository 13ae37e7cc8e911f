"""The books survive an allocator restart, through the Allocator (no Ray cluster: an in-memory store)."""

import random

import pytest

from clear_core.errors import InvalidInputError
from deployments.allocator import Allocator
from deployments.config import AllocatorConfig
from deployments.state_store import MemoryStateStore


def _allocator(store, **budget):
    cfg = AllocatorConfig(policy="clear", budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 50, **budget})
    return Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)


def test_a_restarted_allocator_keeps_its_books_and_pricing_window():
    store = MemoryStateStore()
    a = _allocator(store)
    rng = random.Random(0)
    admitted = []
    for i in range(40):
        d = a.reserve_sync(f"q{i}", rng.lognormvariate(6, 1), log_sigma=0.5)
        if d.admitted:
            admitted.append((f"q{i}", d.cap_tokens))
    for rid, cap in admitted[:10]:
        a.settle_sync(rid, cap // 2)
    a.flush()  # the background writer's snapshot (the async entry points wait for it before answering)
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


def test_a_changed_budget_continues_the_books_spent_stays_spent():
    """A redeploy with another budget under the same name: the refused client does not find a full budget."""
    store = MemoryStateStore()
    a = _allocator(store)  # 400 tokens per query, blocks of 50: the first arrival credits 20,000
    admitted = [(f"q{i}", d.cap_tokens) for i in range(30)
                if (d := a.reserve_sync(f"q{i}", 300.0, log_sigma=0.3)).admitted]
    for rid, cap in admitted[:20]:
        a.settle_sync(rid, cap)
    a.flush()
    before = a.status_sync()
    b = _allocator(store, tokens_per_query=999, window_queries=10)
    after = b.status_sync()
    assert after["restored_after_restart"] is True and after["budget_changed_at_restart"] is True
    assert after["budget"]["tokens_per_query"] == 999 and after["budget"]["window_queries"] == 10
    for key in ("granted_tokens", "spent_tokens", "reserved_tokens", "arrivals", "allocated_tokens_total",
                "generated_tokens_total", "refunded_tokens_total", "in_flight_reservations"):
        assert after[key] == before[key], key
    # The block in progress (arrivals 1-50 of the old budget) credits nothing more: arrivals 31-50 add
    # nothing, and arrival 51 opens a block of the new budget: 10 x 999 tokens.
    for i in range(30, 50):
        b.reserve_sync(f"r{i}", 1e6, log_sigma=0.3)  # asks far more than any cap: abandoned, still an arrival
    assert b.status_sync()["granted_tokens"] == before["granted_tokens"] == 20_000
    b.reserve_sync("r50", 1e6, log_sigma=0.3)
    assert b.status_sync()["granted_tokens"] == 20_000 + 10 * 999
    for rid, cap in admitted[20:]:  # the reservations made under the old budget settle under the new one
        assert b.settle_sync(rid, cap) is not None
    final = b.status_sync()
    assert final["reserved_tokens"] == 0 and final["invariant_holds"] and final["books_reconcile"]


def test_a_seeded_window_prices_the_first_request_like_a_warm_one(tmp_path):
    """A cold allocator with a seed decides the first request as a warm one with that window would."""
    rng = random.Random(5)
    seed = [rng.lognormvariate(6.5, 1.0) for _ in range(256)]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(f'{{"id": "p{i}", "threshold_tokens": {t}}}\n' for i, t in enumerate(seed)))
    tuning = {"pricing_window_requests": 256, "pace_budget": False}
    base = {"policy": "clear", "advanced": tuning,
            "budget": {"mode": "per_query", "tokens_per_query": 300, "window_queries": 1000}}
    seeded = Allocator(AllocatorConfig(**{**base, "advanced": {**tuning, "pricing_window_seed_path": str(path)}}),
                       max_completion_tokens=8192,
                       metrics=False)
    cold = Allocator(AllocatorConfig(**base), max_completion_tokens=8192, metrics=False)
    warm = Allocator(AllocatorConfig(**base), max_completion_tokens=8192, metrics=False)
    warm.market.restore({"window": seed})
    differs = 0
    for i, tau in enumerate((60.0, 150.0, 400.0, 900.0, 2500.0)):
        a, b, c = (x.reserve_sync(f"q{i}", tau, log_sigma=0.5) for x in (seeded, cold, warm))
        assert (a.admitted, a.cap_tokens, a.shadow_price) == (c.admitted, c.cap_tokens, c.shadow_price)
        differs += (a.cap_tokens, a.shadow_price) != (b.cap_tokens, b.shadow_price)
    assert differs >= 3  # priced alone, the first requests would have seen another market
    assert seeded.status_sync()["pricing_window_filled"] == 256  # the window keeps its size


def test_bad_seed_file(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(InvalidInputError, match="seed.jsonl:1"):
        Allocator(AllocatorConfig(advanced={"pricing_window_seed_path": str(path)}), metrics=False)


def test_a_settle_is_written_before_it_is_acknowledged_so_a_restart_never_reopens_it():
    """The ingress stops retrying a settle once acknowledged and keeps renewing its lease: a settle that a
    restart forgot would hold its tokens for good. The acknowledgement waits for the snapshot."""
    import asyncio

    store = MemoryStateStore()
    cfg = AllocatorConfig(policy="clear", advanced={"snapshot_interval_s": 60.0},
                          budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 50})

    async def run():
        a = Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)
        d = await a.reserve("q0", 300.0, log_sigma=0.5, owner="ingress-1")
        assert d.admitted
        settled = await a.settle("q0", 120)
        return d, settled

    d, settled = asyncio.run(run())
    assert settled is not None
    st = Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store).status_sync()
    assert st["restored_after_restart"] and st["in_flight_reservations"] == 0 and st["reserved_tokens"] == 0
    assert st["generated_tokens_total"] == 120 and st["refunded_tokens_total"] == d.cap_tokens - 120


def test_a_replica_restarted_after_the_last_request_still_recovers_lapsed_reservations():
    """No command reaches a replica restarted after the last request; its sweep runs all the same."""
    import asyncio

    store = MemoryStateStore()
    cfg = AllocatorConfig(policy="clear", advanced={"lease_ttl_s": 0.2, "sweep_interval_s": 0.05},
                          budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 50})
    a = Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)
    assert a.reserve_sync("q0", 300.0, log_sigma=0.5, owner="ingress-gone").admitted
    a.flush()

    async def restarted():
        b = Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)  # built on the loop, as Serve does
        await asyncio.sleep(1.0)  # no command at all: only time passes
        return b.status_sync()

    st = asyncio.run(restarted())
    assert st["restored_after_restart"] and st["in_flight_reservations"] == 0 and st["reserved_tokens"] == 0
    assert st["recovered_reservations_total"] == 1 and st["expired_tokens_total"] == 0


def test_the_block_reserve_share_reaches_the_market_and_a_bad_one_is_refused():
    base = {"policy": "clear", "budget": {"mode": "per_query", "tokens_per_query": 300, "window_queries": 100}}
    a = Allocator(AllocatorConfig(**base, advanced={"block_reserve_share": 0.25}), max_completion_tokens=8192, metrics=False)
    assert a.market.block_reserve == 0.25
    assert Allocator(AllocatorConfig(**base), max_completion_tokens=8192, metrics=False).market.block_reserve == 0.5
    with pytest.raises(ValueError, match="block_reserve_share"):
        AllocatorConfig(**base, advanced={"block_reserve_share": 1.5})


def test_a_retry_after_an_allocator_restart_is_not_a_new_arrival():
    """Retry keys are in the snapshot: a client that retries across a restart does not credit the budget twice."""
    store = MemoryStateStore()
    a = _allocator(store, window_queries=1)  # every arrival credits 400 tokens: a double count shows
    d = a.reserve_sync("q0", 100.0, log_sigma=0.3, arrival_key="idem:abc")
    assert d.admitted
    a.settle_sync("q0", 0, failed=True)  # the client got an error (say the allocator went down) and retries
    a.flush()
    b = _allocator(store, window_queries=1)
    before = b.status_sync()
    b.reserve_sync("q0-retry", 100.0, log_sigma=0.3, arrival_key="idem:abc", retry=True)
    after = b.status_sync()
    assert after["arrivals"] == before["arrivals"] == 1 and after["granted_tokens"] == before["granted_tokens"] == 400
    b.reserve_sync("q1", 100.0, log_sigma=0.3, arrival_key="idem:new", retry=True)  # a key never seen: new
    assert b.status_sync()["arrivals"] == 2


def test_a_late_settle_through_the_allocator_charges_the_tokens_received():
    """An ingress replica cut off for longer than its lease: its reservation is recovered, then it settles."""
    store = MemoryStateStore()
    cfg = AllocatorConfig(policy="clear", budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 1},
                          advanced={"lease_ttl_s": 0.05})
    a = Allocator(cfg, max_completion_tokens=8192, metrics=False, store=store)
    d = a.reserve_sync("q0", 100.0, log_sigma=0.3, owner="ingress-stalled")
    assert d.admitted
    import time

    time.sleep(0.1)
    a.ledger.release_lapsed()
    assert a.status_sync()["recovered_tokens_total"] == d.cap_tokens
    s = a.settle_sync("q0", 50)
    st = a.status_sync()
    assert s is not None and s.charged == 50 and st["spent_tokens"] == 50 and st["late_charged_tokens_total"] == 50
    assert st["invariant_holds"] and st["books_reconcile"]
