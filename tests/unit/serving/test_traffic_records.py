"""The ingress sends the learner one record per settled request, saying how it ended (deployments.traffic_log)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.traffic_log import TrafficRecord
from tests.fakes import CHUNK_TOKENS, FakeAllocator, FakeEngine, FakeLearner, make_ingress, make_request


def chat(**fields):
    return {"model": "clear-replay", "messages": [{"role": "user", "content": "What is 2 + 2?"}], **fields}


def logged(tmp_path, allocator, engine, bodies, disconnect=False):
    async def run():
        learner = FakeLearner()
        ing = make_ingress(allocator, engine, learner=learner)
        for b in bodies:
            resp = await ing._complete(make_request(b), "chat")
            if hasattr(resp, "body_iterator"):
                it = resp.body_iterator
                if disconnect:
                    await it.__anext__()
                    await it.__anext__()
                    await it.aclose()  # the client went away after two chunks
                else:
                    async for _ in it:
                        pass
        await asyncio.gather(*ing._background, return_exceptions=True)
        await ing.observations.send()
        return ing, [TrafficRecord(**r) for r in learner.records]

    return asyncio.run(run())


def test_a_capped_and_a_finished_request_are_recorded_as_such(tmp_path):
    ing, records = logged(tmp_path, FakeAllocator(cap=60), FakeEngine(chunks=2), [chat(), chat(stream=True)])
    assert [r.ended for r in records] == ["cap", "cap"]  # the fake engine ends "length": its cap cut it
    assert all(r.tokens == 2 * CHUNK_TOKENS and r.cap_tokens == 60 and r.censored for r in records)
    r = records[0]
    assert r.prediction_source == "fake" and r.predicted_threshold_tokens == 100.0 and r.prompt is None
    assert r.prompt_sha256 == r.prompt_hash("What is 2 + 2?") and ing._seen == {}


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_request_has_no_record(tmp_path, stream):
    _, records = logged(tmp_path, FakeAllocator(admit=False), FakeEngine(), [chat(stream=stream)])
    assert records == []


def test_a_client_that_leaves_is_recorded_as_a_lower_bound(tmp_path):
    gate = asyncio.Event()
    ing, records = logged(tmp_path, FakeAllocator(cap=60), FakeEngine(chunks=10, gate=gate),
                          [chat(stream=True)], disconnect=True)
    (r,) = records
    assert r.ended == "client" and r.censored and ing._seen == {}


def test_an_engine_failure_is_recorded_as_failed(tmp_path):
    _, records = logged(tmp_path, FakeAllocator(cap=60), FakeEngine(chunks=4, fail_after=2), [chat(stream=True)])
    (r,) = records
    assert r.ended == "failed" and r.tokens == 2 * CHUNK_TOKENS
