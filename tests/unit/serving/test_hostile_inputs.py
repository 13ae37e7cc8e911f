"""Hostile clients against the ingress (fake handles, no Ray): every bad input is a clean OpenAI-style 4xx
before any budget is reserved; slow, huge or stalled bodies cannot hold the replica; retries are the same
arrival; faults are never charged for tokens the client did not receive."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

import deployments.ingress as ingress_module
from deployments.config import AppConfig
from deployments.errors import EngineError
from deployments.ingress import Ingress, _engine_failure
from tests.factories import app_args
from tests.unit.serving.test_serving_ingress import (
    CHUNK_TOKENS, FakeAllocator, FakeEngine, FakePredictor, _Call, _Method, chat, settle_tasks,
)

MODEL = "clear-replay"
USER = [{"role": "user", "content": "What is 2+2?"}]


def make_ingress(allocator=None, engine=None, **ingress_cfg) -> Ingress:
    cfg = AppConfig.model_validate(app_args(ingress=ingress_cfg))
    return Ingress(cfg, FakePredictor(), allocator or FakeAllocator(), engine or FakeEngine(), metrics=False)


def request(raw: bytes | list[bytes], headers: dict | None = None, path="/v1/chat/completions", stall=False) -> Request:
    """A request whose body arrives as the given chunks (a list: chunked, no Content-Length)."""
    chunks = list(raw) if isinstance(raw, list) else [raw]
    hdrs = {"content-type": "application/json", **(headers or {})}
    if not isinstance(raw, list):
        hdrs.setdefault("content-length", str(len(raw)))
    sent = {"n": 0}

    async def receive():
        i = sent["n"]
        sent["n"] += 1
        if stall and i >= len(chunks):
            await asyncio.sleep(3600)
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1 or stall}
        await asyncio.sleep(3600)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in hdrs.items() if v is not None]}
    req = Request(scope, receive)
    req.chunks_read = sent
    return req


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "What is 2+2?", **fields}).encode()


def deep(n: int):
    v = "x"
    for _ in range(n):
        v = [v]
    return v


#: (case, chat|completion, raw body, headers, expected status, expected error type)
BAD_INPUTS = [
    ("not json", "chat", b"{not json", None, 400, "invalid_request_error"),
    ("empty body", "chat", b"", None, 400, "invalid_request_error"),
    ("json array", "chat", b"[1, 2]", None, 400, "invalid_request_error"),
    ("json string", "chat", b'"hello"', None, 400, "invalid_request_error"),
    ("invalid utf-8", "chat", b'{"model": "\xff\xfe"}', None, 400, "invalid_request_error"),
    ("lone surrogate", "chat", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\ud800 hi"}]}).encode(),
     None, 400, "invalid_request_error"),
    ("nested 10k deep", "chat", json.dumps({"model": MODEL, "messages": USER, "user": deep(5)}).replace('"x"', "[" * 10000 + "]" * 10000).encode(),
     None, 400, "invalid_request_error"),
    ("nested 40 deep", "chat", json.dumps({"model": MODEL, "messages": USER, "stop": deep(40)}).encode(), None, 400,
     "invalid_request_error"),
    ("text/plain", "chat", body(), {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("form", "chat", body(), {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ("no model", "chat", json.dumps({"messages": USER}).encode(), None, 400, "invalid_request_error"),
    ("model not a string", "chat", body(model=7), None, 400, "invalid_request_error"),
    ("other model", "chat", body(model="gpt-4"), None, 404, "model_not_found"),
    ("no messages", "chat", json.dumps({"model": MODEL}).encode(), None, 400, "invalid_request_error"),
    ("empty messages", "chat", body(messages=[]), None, 400, "invalid_request_error"),
    ("messages not a list", "chat", body(messages="hi"), None, 400, "invalid_request_error"),
    ("message without role", "chat", body(messages=[{"content": "hi"}]), None, 400, "invalid_request_error"),
    ("unknown role beside a user", "chat", body(messages=[{"role": "wizard", "content": "x"}, *USER]), None, 400,
     "invalid_request_error"),
    ("tool role", "chat", body(messages=[*USER, {"role": "tool", "content": "x", "tool_call_id": "1"}]), None, 400,
     "invalid_request_error"),
    ("message extra field", "chat", body(messages=[{"role": "user", "content": "x", "tool_calls": []}]), None, 400,
     "invalid_request_error"),
    ("no user message", "chat", body(messages=[{"role": "system", "content": "x"}]), None, 400, "invalid_request_error"),
    ("blank user message", "chat", body(messages=[{"role": "user", "content": "   "}]), None, 400, "invalid_request_error"),
    ("image part", "chat", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     None, 400, "invalid_request_error"),
    ("content a number", "chat", body(messages=[{"role": "user", "content": 5}]), None, 400, "invalid_request_error"),
    ("max_tokens 0", "chat", body(max_tokens=0), None, 400, "invalid_request_error"),
    ("max_tokens negative", "chat", body(max_tokens=-5), None, 400, "invalid_request_error"),
    ("max_tokens string", "chat", body(max_tokens="10"), None, 400, "invalid_request_error"),
    ("max_tokens bool", "chat", body(max_tokens=True), None, 400, "invalid_request_error"),
    ("max_tokens 1.5", "chat", body(max_tokens=1.5), None, 400, "invalid_request_error"),
    ("max_tokens beyond context", "chat", body(max_tokens=10**9), None, 400, "invalid_request_error"),
    ("n=2", "chat", body(n=2), None, 400, "invalid_request_error"),
    ("stream a string", "chat", body(stream="yes"), None, 400, "invalid_request_error"),
    ("stream_options without stream", "chat", body(stream_options={"include_usage": True}), None, 400,
     "invalid_request_error"),
    ("stream_options unknown key", "chat", body(stream=True, stream_options={"x": 1}), None, 400, "invalid_request_error"),
    ("temperature 2.5", "chat", body(temperature=2.5), None, 400, "invalid_request_error"),
    ("temperature -1", "chat", body(temperature=-1), None, 400, "invalid_request_error"),
    ("temperature string", "chat", body(temperature="hot"), None, 400, "invalid_request_error"),
    ("top_p 1.5", "chat", body(top_p=1.5), None, 400, "invalid_request_error"),
    ("presence_penalty 3", "chat", body(presence_penalty=3), None, 400, "invalid_request_error"),
    ("frequency_penalty -3", "chat", body(frequency_penalty=-3), None, 400, "invalid_request_error"),
    ("seed float", "chat", body(seed=1.5), None, 400, "invalid_request_error"),
    ("seed 2^64", "chat", body(seed=2**64), None, 400, "invalid_request_error"),
    ("stop 5 sequences", "chat", body(stop=["a", "b", "c", "d", "e"]), None, 400, "invalid_request_error"),
    ("stop a number", "chat", body(stop=3), None, 400, "invalid_request_error"),
    ("logit_bias 500", "chat", body(logit_bias={"15": 500}), None, 400, "invalid_request_error"),
    ("logit_bias word key", "chat", body(logit_bias={"hello": 1}), None, 400, "invalid_request_error"),
    ("user a number", "chat", body(user=5), None, 400, "invalid_request_error"),
    ("logprobs", "chat", body(logprobs=True), None, 400, "invalid_request_error"),
    ("top_logprobs", "chat", body(top_logprobs=3), None, 400, "invalid_request_error"),
    ("tools", "chat", body(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, "invalid_request_error"),
    ("tool_choice", "chat", body(tool_choice="required"), None, 400, "invalid_request_error"),
    ("response_format", "chat", body(response_format={"type": "json_object"}), None, 400, "invalid_request_error"),
    ("unknown field", "chat", body(frobnicate=1), None, 400, "invalid_request_error"),
    ("sample index negative", "chat", body(clear_sample_index=-1), None, 400, "invalid_request_error"),
    ("sample index out of range", "chat", body(clear_sample_index=10**6), None, 400, "invalid_request_error"),
    ("echo", "completion", completion(echo=True), None, 400, "invalid_request_error"),
    ("best_of 3", "completion", completion(best_of=3), None, 400, "invalid_request_error"),
    ("suffix", "completion", completion(suffix="end"), None, 400, "invalid_request_error"),
    ("completion logprobs", "completion", completion(logprobs=5), None, 400, "invalid_request_error"),
    ("batched prompts", "completion", completion(prompt=["a", "b"]), None, 400, "invalid_request_error"),
    ("token-id prompt", "completion", completion(prompt=[1, 2, 3]), None, 400, "invalid_request_error"),
    ("empty prompt", "completion", completion(prompt=""), None, 400, "invalid_request_error"),
    ("prompt beyond context", "completion", completion(prompt="word " * 40000), None, 400, "context_length_exceeded"),
    ("body over the limit", "chat", body(user="x" * 2_000_000), None, 413, "request_too_large"),
    ("no key", "chat", body(), {"authorization": None}, 401, "authentication_error"),
    ("wrong key", "chat", body(), {"authorization": "Bearer nope"}, 401, "authentication_error"),
]


@pytest.mark.parametrize("case,kind,raw,headers,status,etype", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clean_4xx_before_any_budget_is_reserved(case, kind, raw, headers, status, etype):
    async def run():
        alloc, engine = FakeAllocator(), FakeEngine()
        keys = ["k1"] if headers and "authorization" in headers else []
        ing = make_ingress(alloc, engine, api_keys=keys)
        resp = await ing._complete(request(raw, headers), kind)
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
        ing = make_ingress(max_request_body_bytes=10_000)
        req = request([b"x" * 4096] * 7500)  # 30 MB, chunked, no Content-Length
        resp = await ing._complete(req, "chat")
        return resp, req.chunks_read["n"]

    resp, read = asyncio.run(run())
    assert resp.status_code == 413 and json.loads(resp.body)["error"]["type"] == "request_too_large"
    assert read == 3  # stopped at the first chunk past 10,000 bytes


def test_stalled_bodies_time_out_and_only_a_few_may_stall_at_once():
    async def run():
        alloc = FakeAllocator()
        ing = make_ingress(alloc, body_read_timeout_s=0.6, slow_body_after_s=0.05, max_slow_body_reads=3)
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

        alloc.reserve = _Method(dying_reserve)
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
            return _Call(None)

        alloc.settle = _Method(flaky_settle)
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
            monkeypatch.setattr(ingress_module, "NATURAL_STOP", "length")  # the fake engine ends with "length"
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
