"""Hostile clients against the ingress (fake handles, no Ray): every bad input is a clean OpenAI-style 4xx
before any budget is reserved; slow, huge or stalled bodies cannot hold the replica; retries are the same
arrival; faults are never charged for tokens the client did not receive."""

from __future__ import annotations

import asyncio
import json

import pytest

import deployments.ingress as ingress_module
from deployments.errors import EngineError
from deployments.ingress import _engine_failure
from load_tests.hostile_inputs import BAD_INPUTS, body
from tests.fakes import (
    CHUNK_TOKENS, FakeAllocator, FakeEngine, RemoteCall, RemoteMethod, make_ingress, request, settle_tasks,
)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name for c in BAD_INPUTS])
def test_bad_input_is_a_clean_4xx_before_any_budget_is_reserved(case):
    status, etype = case.status, case.error_type

    async def run():
        alloc, engine = FakeAllocator(), FakeEngine()
        ing = make_ingress(alloc, engine, api_keys=["k1"])
        headers = {"authorization": "Bearer k1", **case.headers}
        resp = await ing._complete(request(case.raw, {k: v for k, v in headers.items() if v is not None}), case.kind)
        await settle_tasks(ing)
        return alloc, engine, resp

    alloc, engine, resp = asyncio.run(run())
    assert resp.status_code == status, json.loads(resp.body)
    err = json.loads(resp.body)["error"]
    assert err["type"] == etype and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "File \"" not in err["message"]
    assert alloc.reserved == [] and alloc.settled == [] and engine.requests == []


def test_defaults_of_unsupported_fields_are_accepted():
    async def run():
        alloc = FakeAllocator()
        ing = make_ingress(alloc)
        resp = await ing._complete(request(body(logprobs=False, tool_choice="none", n=1, store=False)), "chat")
        await settle_tasks(ing)
        return resp

    assert asyncio.run(run())["usage"]["completion_tokens"] == 4 * CHUNK_TOKENS


def test_a_chunked_body_over_the_limit_is_refused_without_reading_the_rest():
    async def run():
        ing = make_ingress(advanced={"max_request_body_bytes": 10_000})
        req = request([b"x" * 4096] * 7500)  # 30 MB, chunked, no Content-Length
        resp = await ing._complete(req, "chat")
        return resp, req.chunks_read["n"]

    resp, read = asyncio.run(run())
    assert resp.status_code == 413 and json.loads(resp.body)["error"]["type"] == "request_too_large"
    assert read == 3  # stopped at the first chunk past 10,000 bytes


def test_stalled_bodies_time_out_and_only_a_few_may_stall_at_once():
    async def run():
        alloc = FakeAllocator()
        ing = make_ingress(alloc, advanced={"body_read_timeout_s": 0.6, "slow_body_after_s": 0.05, "max_slow_body_reads": 3})
        stalled = [asyncio.create_task(ing._complete(request([b'{"model": '], stall=True), "chat")) for _ in range(10)]
        await asyncio.sleep(0.2)
        # meanwhile a normal client is served at once
        t0 = asyncio.get_running_loop().time()
        ok = await ing._complete(request(body()), "chat")
        served_in = asyncio.get_running_loop().time() - t0
        results = await asyncio.gather(*stalled)
        await settle_tasks(ing)
        return ok, served_in, results, ing, alloc

    ok, served_in, results, ing, alloc = asyncio.run(run())
    assert ok["usage"]["completion_tokens"] == 4 * CHUNK_TOKENS and served_in < 0.3
    assert [r.status_code for r in results] == [408] * 10
    messages = [json.loads(r.body)["error"]["message"] for r in results]
    assert sum("already waiting" in m for m in messages) == 7  # refused at once: the gate holds 3
    assert sum("did not arrive within" in m for m in messages) == 3
    assert ing.slow_readers.active == 0 and alloc.reserved == [alloc.reserved[0]]


def test_a_burst_of_late_bodies_is_served_while_slots_are_free():
    """Under load the proxy hands bodies over late; with no explicit limit the gate holds half the replica's
    slots (256 -> 128), so a burst of 100 late but complete bodies is served, not refused as stalled."""

    async def run():
        alloc = FakeAllocator()
        ing = make_ingress(alloc, advanced={"slow_body_after_s": 0.02}, deployment={"max_ongoing_requests": 256})
        late = [ing._complete(request(body(), delay_s=0.2), "chat") for _ in range(100)]
        results = await asyncio.gather(*late)
        await settle_tasks(ing)
        return ing, results

    ing, results = asyncio.run(run())
    assert ing.slow_readers.limit == 128
    assert [isinstance(r, dict) for r in results] == [True] * 100, [getattr(r, "status_code", 200) for r in results]
    assert ing.slow_readers.active == 0


def test_the_slow_reader_gate_is_half_the_slots_unless_set():
    assert make_ingress(deployment={"max_ongoing_requests": 7}).slow_readers.limit == 3
    assert make_ingress(deployment={"max_ongoing_requests": 1}).slow_readers.limit == 1
    assert make_ingress(advanced={"max_slow_body_reads": 5}, deployment={"max_ongoing_requests": 256}).slow_readers.limit == 5


def test_a_retry_is_marked_with_the_first_attempts_arrival_key():
    async def run():
        alloc = FakeAllocator()
        ing = make_ingress(alloc)
        await ing._complete(request(body()), "chat")
        await ing._complete(request(body(), {"x-stainless-retry-count": "1"}), "chat")
        await ing._complete(request(body(temperature=0.5), {"x-stainless-retry-count": "2"}), "chat")
        await ing._complete(request(body(), {"idempotency-key": "abc"}), "chat")
        await ing._complete(request(body(temperature=1.0), {"idempotency-key": "abc"}), "chat")
        await settle_tasks(ing)
        return alloc.arrivals

    (k0, r0), (k1, r1), (k2, r2), (k3, r3), (k4, r4) = asyncio.run(run())
    assert (r0, r1, r2) == (False, True, True) and k1 == k0 and k2 != k0  # same body: same arrival
    assert r3 and r4 and k3 == k4 != k0  # an Idempotency-Key names the arrival, whatever the body


def test_an_abandonment_tells_the_openai_client_whether_to_retry():
    async def run():
        ing = make_ingress(FakeAllocator(admit=False))
        return await ing._complete(request(body()), "chat")

    resp = asyncio.run(run())
    assert resp.status_code == 429
    assert resp.headers["x-should-retry"] == "false" and resp.headers["retry-after"] == "2"
    assert json.loads(resp.body)["error"]["should_retry"] is False


def test_a_failed_reserve_is_a_503_and_releases_the_reservation_it_may_have_made():
    async def run():
        alloc = FakeAllocator()

        def dying_reserve(rid, *args):
            alloc.reserved.append(rid)
            raise ConnectionError("allocator actor died")

        alloc.reserve = RemoteMethod(dying_reserve)
        ing = make_ingress(alloc)
        resp = await ing._complete(request(body()), "chat")
        await settle_tasks(ing)
        return alloc, resp

    alloc, resp = asyncio.run(run())
    assert resp.status_code == 503 and resp.headers["x-should-retry"] == "true"
    assert alloc.settled == [(alloc.reserved[0], 0)] and alloc.failed == [True]


def test_a_settle_is_retried_until_the_allocator_acknowledges_it(monkeypatch):
    monkeypatch.setattr(ingress_module, "SETTLE_BACKOFF_S", (0.01,))

    async def run():
        alloc = FakeAllocator()
        attempts = []

        def flaky_settle(rid, generated, failed):
            attempts.append(rid)
            if len(attempts) < 3:
                raise ConnectionError("allocator restarting")
            alloc.settled.append((rid, generated))
            return RemoteCall(None)

        alloc.settle = RemoteMethod(flaky_settle)
        ing = make_ingress(alloc)
        await ing._complete(request(body()), "chat")
        for _ in range(50):
            await asyncio.sleep(0.01)
        return alloc, attempts

    alloc, attempts = asyncio.run(run())
    assert len(attempts) == 3 and alloc.settled == [(alloc.reserved[0], 4 * CHUNK_TOKENS)]


@pytest.mark.parametrize("max_tokens,market_cap,finish,expected", [
    (50, 60, "length", "client_max_tokens"),
    (None, 60, "length", "clear_cap"),
    (80, 60, "length", "clear_cap"),
    (50, 60, "stop", "natural_stop"),
])
def test_the_clear_object_says_who_stopped_the_completion(max_tokens, market_cap, finish, expected, monkeypatch):
    async def run():
        engine = FakeEngine(chunks=2)
        ing = make_ingress(FakeAllocator(cap=market_cap), engine)
        if finish == "stop":
            monkeypatch.setattr(ingress_module, "CAP_STOP", "no cap")  # the fake engine ends with "length"
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        return await ing._complete(request(body(**extra)), "chat")

    assert asyncio.run(run())["clear"]["stopped_by"] == expected


def test_an_engine_error_from_a_remote_replica_carries_no_traceback():
    from ray.exceptions import RayTaskError

    inner = EngineError("replay engine: injected failure after 16 tokens")
    wrapped = RayTaskError("generate", "Traceback (most recent call last):\n  File \"/x.py\"", inner).as_instanceof_cause()
    assert isinstance(wrapped, EngineError) and "pid=" in str(wrapped) and 'File "' in str(wrapped)
    clean = _engine_failure(wrapped)
    assert clean is inner and "pid=" not in str(clean) and 'File "' not in str(clean)
    other = _engine_failure(RuntimeError("/home/user/secret.py line 3 at 10.0.0.7"))
    assert isinstance(other, EngineError) and "10.0.0.7" not in str(other) and "RuntimeError" in str(other)
