"""Decisions at the ingress (allocator.decisions: ingress), no Ray: the ingress prices from a quote and
reserves against its lease, with a real Allocator behind a fake handle that has no reserve or settle at all."""

from __future__ import annotations

import asyncio
import json

from deployments.allocator import Allocator
from deployments.config import AppConfig
from deployments.ingress import Ingress
from deployments.state_store import MemoryStateStore
from tests.factories import _merge, app_args
from tests.fakes import (
    CHUNK_TOKENS,
    AllocatorHandle,
    FakeEngine,
    FakePredictor,
    chat,
    make_request,
)

LEASE_ARGS = {"predictor": {"placement": "deployment"}, "allocator": {"policy": "clear-cost", "decisions": "ingress", "advanced": {"lease_block_tokens": 2000},
                            "budget": {"mode": "per_query", "tokens_per_query": 512, "window_queries": 100,
                                       "refund_unused": True}}}


def _setup(store=None, engine=None, **overrides):
    args = app_args(**LEASE_ARGS)
    _merge(args, overrides)
    cfg = AppConfig.model_validate(args)
    alloc = Allocator(cfg.allocator, cfg.max_completion_tokens, metrics=False, store=store)
    handle = AllocatorHandle(alloc)
    return cfg, alloc, handle, Ingress(cfg, FakePredictor(), handle, engine or FakeEngine(chunks=4), metrics=False)


def test_requests_are_decided_and_settled_locally_and_reach_the_books_with_the_next_report():
    async def run():
        cfg, alloc, handle, ing = _setup()
        answers = [await ing._complete(make_request(chat(max_tokens=50)), "chat") for _ in range(5)]
        reports_after_requests = handle.reports
        await ing.leases.sync()
        return alloc, handle, ing, answers, reports_after_requests

    alloc, handle, ing, answers, reports = asyncio.run(run())
    # The first request waits for a quote, then for its cap (its arrival opens the budget block, and the
    # answer sets the lease's target); the second for the lease's first block; the other three needed no
    # call to the allocator.
    assert reports == 3
    for a in answers:
        assert a["clear"]["decision"] == "admitted" and a["clear"]["allocated_tokens"] == 50
        assert a["usage"]["completion_tokens"] == 4 * CHUNK_TOKENS
    st = alloc.status_sync()
    assert st["arrivals"] == 5 and st["generated_tokens_total"] == 5 * 4 * CHUNK_TOKENS
    assert st["spent_tokens"] == 5 * 4 * CHUNK_TOKENS  # a refunding budget charges what was generated
    assert st["allocated_tokens_total"] == 5 * 50 and st["invariant_holds"] and st["books_reconcile"]
    assert st["leased_tokens"] == ing.leases.market.lease.held > 0
    assert st["lease_in_flight_requests"] == 0  # every request had ended before the last report
    assert st["tenants"]["default"]["admitted"] == 5


def test_an_engine_failure_and_a_disconnect_are_charged_what_was_received():
    async def run():
        cfg, alloc, handle, ing = _setup(engine=FakeEngine(chunks=4, fail_after=2))
        failed = await ing._complete(make_request(chat()), "chat")  # a whole answer that failed: nothing received
        streamed = await ing._complete(make_request(chat(stream=True)), "chat")
        async for _ in streamed.body_iterator:  # a stream that failed after 2 chunks
            pass
        await ing.leases.sync()
        return alloc, failed

    alloc, failed = asyncio.run(run())
    assert failed.status_code == 502
    st = alloc.status_sync()
    assert st["spent_tokens"] == 2 * CHUNK_TOKENS and st["failed_requests_total"] == 2
    assert st["reserved_tokens"] == 0 and st["lease_reserved_tokens"] == 0 and st["books_reconcile"]


def test_without_an_allocator_a_replica_with_no_quote_answers_503_and_one_with_a_lease_goes_on():
    async def run():
        cfg, alloc, handle, ing = _setup()
        handle.up = False
        first = await ing._complete(make_request(chat()), "chat")
        handle.up = True
        ok = await ing._complete(make_request(chat()), "chat")
        handle.up = False  # the allocator restarts: decisions go on from the lease and the last quote
        during = [await ing._complete(make_request(chat(max_tokens=40)), "chat") for _ in range(3)]
        handle.up = True
        await ing.leases.sync()
        return alloc, first, ok, during

    alloc, first, ok, during = asyncio.run(run())
    assert first.status_code == 503 and json.loads(first.body)["error"]["type"] == "allocator_unavailable"
    assert ok["clear"]["decision"] == "admitted"
    assert all(d["clear"]["decision"] == "admitted" for d in during)
    assert alloc.status_sync()["arrivals"] == 4  # the refused one never reached the market


def test_a_lapsed_lease_is_taken_back_and_the_replica_opens_a_new_one():
    async def run():
        # A report renews the lease: the background loop must not report while the replica is "cut off".
        cfg, alloc, handle, ing = _setup(allocator={"advanced": {"lease_ttl_s": 0.05, "report_interval_s": 5.0}})
        await ing._complete(make_request(chat()), "chat")
        await ing.leases.sync()
        old = ing.leases.owner
        await asyncio.sleep(0.1)
        alloc.expire_sync()  # the sweep: the lease lapsed, its tokens are back in the pool
        mid = alloc.status_sync()
        again = await ing._complete(make_request(chat()), "chat")  # revoked: a new lease, a new owner
        return alloc, ing, old, mid, again

    alloc, ing, old, mid, again = asyncio.run(run())
    assert mid["leased_tokens"] == 0 and mid["invariant_holds"]
    assert ing.leases.owner != old and again["clear"]["decision"] == "admitted"
    assert alloc.ledger.is_revoked(old)


def test_a_lease_grant_is_written_before_it_is_answered_so_a_restart_never_lends_it_twice():
    async def run():
        store = MemoryStateStore()
        cfg, alloc, handle, ing = _setup(store=store, allocator={"advanced": {"snapshot_interval_s": 60.0}})
        await ing._complete(make_request(chat()), "chat")
        return cfg, store, ing

    cfg, store, ing = asyncio.run(run())
    lent = ing.leases.market.lease.granted
    restarted = Allocator(cfg.allocator, cfg.max_completion_tokens, metrics=False, store=store)
    st = restarted.status_sync()
    assert lent > 0 and st["restored_after_restart"]
    # The grant survived, though no other snapshot was due for a minute; the request's settle (12 tokens
    # charged) was not reported yet, so the restored books still count them as leased: tighter, never looser.
    assert st["leased_tokens"] == lent and st["spent_tokens"] == 0
    assert st["available_tokens"] == st["granted_tokens"] - lent


def test_a_background_loop_ends_when_its_cancellation_was_swallowed():
    """Python 3.11's wait_for can swallow a cancellation that lands as its inner await completes; the
    replica's loops check the task's pending cancellation each round, so asyncio.run still ends."""
    import deployments.background as bg

    rounds = {"n": 0}

    async def loop():
        while True:
            bg.stop_if_cancelled()
            rounds["n"] += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # what the 3.11 wait_for race does: the cancellation is lost

    async def run():
        task = asyncio.get_running_loop().create_task(loop())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        return task

    event_loop = asyncio.new_event_loop()  # not asyncio.run: without the check its cleanup would wait forever
    try:
        task = event_loop.run_until_complete(run())
        assert task.done() and task.cancelled() and rounds["n"] >= 2
    finally:
        event_loop.close()


def test_a_replica_that_stops_reports_what_it_charged_since_its_last_report():
    """Serve awaits what Ingress.__del__ returns when the replica stops (a rolling update, a scale-down): one
    last report, so the charges since the last one reach the books instead of lapsing with the lease."""
    async def run():
        cfg, alloc, handle, ing = _setup()
        for _ in range(3):
            await ing._complete(make_request(chat(max_tokens=50)), "chat")
        await ing.leases.sync()
        reported = alloc.status_sync()["spent_tokens"]
        await ing._complete(make_request(chat(max_tokens=50)), "chat")  # charged in the lease, not reported yet
        assert alloc.status_sync()["spent_tokens"] == reported
        stopping = ing.__del__()
        assert stopping is not None
        await stopping
        assert ing.__del__() is None  # Python's own finalizer may call it again: nothing twice
        return reported, alloc.status_sync(), handle.reports

    reported, st, reports = asyncio.run(run())
    assert st["spent_tokens"] == reported + 4 * CHUNK_TOKENS and st["arrivals"] == 4
    assert st["lease_reserved_tokens"] == 0 and st["books_reconcile"] and st["invariant_holds"]
