"""The ingress with fake handles (no Ray): every reservation is settled exactly once, with the
tokens the client received, whether the request succeeds, the engine fails, or the client leaves."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from deployments.config import AppConfig
from deployments.errors import EngineError
from deployments.ingress import Ingress
from tests.factories import app_args
from tests.fakes import (
    CHUNK_TOKENS,
    FakeAllocator,
    FakeEngine,
    FakePredictor,
    chat,
    make_ingress,
    make_request,
    settle_tasks,
)

def test_success_settles_once_with_the_tokens_generated():
    async def run():
        alloc, engine = FakeAllocator(cap=60), FakeEngine(chunks=4)
        ing = make_ingress(alloc, engine)
        resp = await ing._complete(make_request(chat(max_tokens=50)), "chat")
        await settle_tasks(ing)
        return alloc, engine, resp

    alloc, engine, resp = asyncio.run(run())
    assert alloc.settled == [(alloc.reserved[0], 4 * CHUNK_TOKENS)]
    assert engine.requests[0].cap_tokens == 50  # min(client max_tokens, CLEAR cap)
    assert resp["usage"]["completion_tokens"] == 4 * CHUNK_TOKENS
    assert resp["clear"]["allocated_tokens"] == 50 and resp["clear"]["decision"] == "admitted"


@pytest.mark.parametrize("stream", [False, True])
def test_engine_error_settles_once_with_what_was_received(stream):
    async def run():
        alloc, engine = FakeAllocator(), FakeEngine(chunks=4, fail_after=2)
        ing = make_ingress(alloc, engine)
        resp = await ing._complete(make_request(chat(stream=stream)), "chat")
        body = b""
        if stream:
            async for part in resp.body_iterator:
                body += part.encode() if isinstance(part, str) else part
        await settle_tasks(ing)
        return alloc, resp, body

    alloc, resp, body = asyncio.run(run())
    # a stream sent 2 chunks before the failure; a whole answer sent nothing: each pays what it received
    assert alloc.settled == [(alloc.reserved[0], 2 * CHUNK_TOKENS if stream else 0)]
    assert alloc.failed == [True]  # a failed settle: the rest of the cap returns to the pool in every budget mode
    if stream:  # the error comes as an SSE error event, then [DONE]
        assert EngineError.error_type in body.decode() and body.decode().rstrip().endswith("[DONE]")
    else:
        assert resp.status_code == 502 and json.loads(resp.body)["error"]["type"] == EngineError.error_type


def test_client_disconnect_mid_stream_settles_once_and_cancels_the_engine():
    async def run():
        gate = asyncio.Event()
        alloc, engine = FakeAllocator(), FakeEngine(chunks=10, gate=gate)
        ing = make_ingress(alloc, engine)
        resp = await ing._complete(make_request(chat(stream=True)), "chat")
        it = resp.body_iterator

        async def consume():
            async for _ in it:
                pass

        task = asyncio.create_task(consume())
        await gate.wait()
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await it.aclose()
        await settle_tasks(ing)
        return alloc, engine

    alloc, engine = asyncio.run(run())
    assert alloc.settled == [(alloc.reserved[0], 2 * CHUNK_TOKENS)] and alloc.failed == [False]
    assert engine.streams[0].cancelled


def test_cancelled_whole_request_settles_once_and_pays_nothing_it_never_received():
    async def run():
        gate = asyncio.Event()
        alloc, engine = FakeAllocator(), FakeEngine(chunks=10, gate=gate)
        ing = make_ingress(alloc, engine)
        task = asyncio.create_task(ing._complete(make_request(chat()), "chat"))
        await gate.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle_tasks(ing)
        return alloc

    alloc = asyncio.run(run())
    assert alloc.settled == [(alloc.reserved[0], 0)] and alloc.failed == [True]


def test_abandoned_and_malformed_requests_never_settle_nor_reach_the_engine():
    async def run():
        alloc, engine = FakeAllocator(admit=False), FakeEngine()
        ing = make_ingress(alloc, engine)
        abandoned = await ing._complete(make_request(chat()), "chat")
        bad = await ing._complete(make_request({"model": "clear-replay", "messages": []}), "chat")
        await settle_tasks(ing)
        return alloc, engine, abandoned, bad

    alloc, engine, abandoned, bad = asyncio.run(run())
    assert abandoned.status_code == 429 and json.loads(abandoned.body)["error"]["type"] == "budget_abandoned"
    assert abandoned.headers["retry-after"] == "2"
    assert bad.status_code == 400
    assert len(alloc.reserved) == 1 and alloc.settled == [] and engine.requests == []


def _with_headers(req: Request, **headers) -> Request:
    req.scope["headers"] = req.scope["headers"] + [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return req


def test_the_tenant_comes_from_the_header_or_the_api_key():
    async def run(args, **headers):
        alloc, engine = FakeAllocator(cap=60), FakeEngine(chunks=1)
        ing = Ingress(AppConfig.model_validate(args), FakePredictor(), alloc, engine, metrics=False)
        resp = await ing._complete(_with_headers(make_request(chat(max_tokens=50)), **headers), "chat")
        await settle_tasks(ing)
        return alloc, resp

    alloc, _ = asyncio.run(run(app_args(), x_clear_tenant="team-a.prod"))
    assert alloc.tenants == ["team-a.prod"]
    alloc, _ = asyncio.run(run(app_args()))
    assert alloc.tenants == ["default"]
    alloc, resp = asyncio.run(run(app_args(), x_clear_tenant="bad tenant!"))
    assert alloc.tenants == [] and resp.status_code == 400
    assert json.loads(resp.body)["error"]["param"] == "X-Clear-Tenant"
    keyed = app_args()
    keyed["ingress"] = {"api_keys": ["k1", "k2"], "api_key_tenants": {"k1": "gold"}}
    alloc, _ = asyncio.run(run(keyed, authorization="Bearer k1", x_clear_tenant="spoofed"))
    assert alloc.tenants == ["gold"]  # with keys on, the key decides, not the header
    alloc, _ = asyncio.run(run(keyed, authorization="Bearer k2"))
    assert alloc.tenants[0].startswith("key-") and "k2" not in alloc.tenants[0] and len(alloc.tenants[0]) == 16


def test_config_refuses_weights_or_cap_budgets_the_policy_cannot_price():
    from pydantic import ValidationError

    base = app_args()
    cost = {**base, "allocator": {**base.get("allocator", {}), "policy": "clear-cost"}}
    with pytest.raises(ValidationError, match="refund_unused"):
        AppConfig.model_validate(cost)  # per_query charges whole caps by default
    ok = {**cost, "allocator": {**cost["allocator"], "budget": {"mode": "per_query", "refund_unused": True},
                                "tenant_weights": {"gold": 4.0}}}
    AppConfig.model_validate(ok)
    weighted_clear = {**base, "allocator": {**base.get("allocator", {}), "tenant_weights": {"gold": 4.0}}}
    with pytest.raises(ValidationError, match="weights"):
        AppConfig.model_validate(weighted_clear)


def test_a_client_that_leaves_while_its_answer_waits_for_the_settle_is_charged_nothing():
    """Decisions central: a whole answer waits for the settle's acknowledgement before it is sent. A client
    that leaves in that wait never receives the answer, so the charge is taken back once the settle lands."""
    from deployments.allocator import Allocator
    from deployments.config import AllocatorConfig

    alloc = Allocator(AllocatorConfig(policy="clear", budget={"mode": "per_query", "tokens_per_query": 400,
                                                              "window_queries": 10}),
                      max_completion_tokens=8192, metrics=False)

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    class SlowSettleHandle:
        def __init__(self):
            self.settling = asyncio.Event()

            async def settle(rid, generated, failed):
                self.settling.set()
                await asyncio.sleep(0.2)  # the acknowledgement is slow: the client leaves meanwhile
                return await alloc.settle(rid, generated, failed)

            self.reserve = Method(alloc.reserve)
            self.settle = Method(settle)
            self.correct = Method(alloc.correct)
            self.renew = Method(alloc.renew)

    async def run():
        handle = SlowSettleHandle()
        ing = make_ingress(handle, FakeEngine(chunks=4))
        task = asyncio.create_task(ing._complete(make_request(chat(max_tokens=50)), "chat"))
        await handle.settling.wait()  # the answer is built and waits for the settle
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle_tasks(ing)
        await asyncio.sleep(0.3)
        await settle_tasks(ing)
        return alloc.status_sync()

    st = asyncio.run(run())
    assert st["arrivals"] == 1 and st["allocated_tokens_total"] == 50
    assert st["spent_tokens"] == 0 and st["generated_tokens_total"] == 0 and st["refunded_tokens_total"] == 50
    assert st["corrected_tokens_total"] == 50 and st["invariant_holds"] and st["books_reconcile"]
