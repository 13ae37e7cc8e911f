"""What the serving code logs per request (fake handles, no Ray): nothing at INFO or above on a healthy
request, a 429 or any client error; one line without a traceback for an engine fault; Serve's access
line only on the ingress; background loops that end when Serve stops the replica."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from clear_core.errors import ClearError
from deployments.allocator import Allocator
from deployments.config import AllocatorConfig
from deployments.errors import BadRequestError
from load_tests.hostile_inputs import BAD_INPUTS
from tests.fakes import FakeAllocator, FakeEngine, RemoteMethod, chat, make_ingress, request, settle_tasks


class _RemoteError(Exception):
    """What a Ray handle raises for an error in a remote replica: the cause inside, a traceback as text."""

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__('Traceback (most recent call last):\n  File "/srv/engine.py", line 7\n' + repr(cause))


class _FailingEngine(FakeEngine):
    def __init__(self, exc: BaseException):
        super().__init__()

        def generate(ereq):
            self.requests.append(ereq)

            async def gen():
                raise exc
                yield  # pragma: no cover  (an async generator that fails at its first step)

            return gen()

        self.generate = RemoteMethod(generate)


@pytest.fixture
def logs(caplog):
    """Every record the deployments log, from DEBUG up: they log to ``ray.serve``, which Ray sets not to
    propagate, so caplog's root handler alone would see none of them."""
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.addHandler(caplog.handler)
    serve_logger.setLevel(logging.DEBUG)
    try:
        yield lambda: [r for r in caplog.records if r.name == "ray.serve" or r.name.startswith("deployments")]
    finally:
        serve_logger.removeHandler(caplog.handler)
        serve_logger.setLevel(level)


def _serve(ingress, body: bytes | dict, **headers):
    async def run():
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        resp = await ingress._complete(request(raw, headers or None), "chat")
        if hasattr(resp, "body_iterator"):
            async for _ in resp.body_iterator:
                pass
        await settle_tasks(ingress)
        return resp

    return asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True])
def test_a_served_request_logs_nothing_at_info(logs, stream):
    ing = make_ingress(FakeAllocator(), FakeEngine(chunks=4))
    for _ in range(3):
        _serve(ing, chat(stream=stream))
    assert [r for r in logs() if r.levelno >= logging.INFO] == []


def test_an_abandoned_request_logs_nothing_at_info(logs):
    resp = _serve(make_ingress(FakeAllocator(admit=False)), chat())
    assert resp.status_code == 429
    assert [r for r in logs() if r.levelno >= logging.INFO] == []


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name for c in BAD_INPUTS])
def test_a_client_error_is_never_an_error_record_nor_a_traceback(logs, case):
    ing = make_ingress(FakeAllocator(), FakeEngine(), api_keys=["k1"])
    headers = {"authorization": "Bearer k1", **case.headers}
    resp = _serve(ing, case.raw, **{k: v for k, v in headers.items() if v is not None})
    assert 400 <= resp.status_code < 500
    assert [r for r in logs() if r.levelno >= logging.INFO or r.exc_info] == []


def test_a_client_error_raised_by_the_engine_is_logged_at_debug_only(logs):
    bad = BadRequestError("clear_sample_index=9 out of range", param="clear_sample_index")
    resp = _serve(make_ingress(FakeAllocator(), _FailingEngine(_RemoteError(bad))), chat())
    assert resp.status_code == 400
    records = logs()
    assert [r for r in records if r.levelno >= logging.INFO or r.exc_info] == []
    assert any("engine failed" in r.getMessage() for r in records if r.levelno == logging.DEBUG)


def test_an_engine_fault_is_one_warning_line_without_the_remote_traceback(logs):
    resp = _serve(make_ingress(FakeAllocator(), _FailingEngine(_RemoteError(RuntimeError("replica died")))), chat())
    assert resp.status_code == 502
    loud = [r for r in logs() if r.levelno >= logging.INFO]
    assert [r.levelno for r in loud] == [logging.WARNING]
    text = loud[0].getMessage()
    assert loud[0].exc_info is None and "\n" not in text and "Traceback" not in text and "RuntimeError" in text


def test_a_settle_of_an_unknown_reservation_is_not_an_info_line(logs):
    cfg = AllocatorConfig(policy="clear", budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 50})
    alloc = Allocator(cfg, max_completion_tokens=8192, metrics=False)
    d = alloc.reserve_sync("q0", 300.0, log_sigma=0.5)
    assert d.admitted
    assert alloc.settle_sync("q0", 10) is not None
    assert alloc.settle_sync("q0", 10) is None  # a retried settle: acknowledged, books unchanged
    assert [r for r in logs() if r.levelno >= logging.INFO] == []


def test_only_the_ingress_keeps_serves_access_log():
    from deployments.app import build_app
    from tests.factories import app_args

    ingress = build_app(app_args(predictor={"placement": "deployment"}))._bound_deployment
    inner = {a._bound_deployment.name: a._bound_deployment.logging_config
             for a in ingress.init_args if hasattr(a, "_bound_deployment")}
    assert sorted(inner) == ["Allocator", "Predictor", "ReplayEngine"]
    assert all(cfg["enable_access_log"] is False for cfg in inner.values())
    assert (ingress.logging_config or {}).get("enable_access_log", True) is True  # one line per HTTP request


def test_the_vllm_replicas_log_no_access_line_per_engine_call():
    from deployments.config import VLLMEngineConfig
    from deployments.engines.vllm import build_vllm_deployment

    app = build_vllm_deployment(VLLMEngineConfig(model_source="some/model"), "clear-tiny")
    assert app._bound_deployment.logging_config["enable_access_log"] is False


def test_stopping_the_replicas_ends_their_background_loops():
    """Serve calls __del__ when it stops a replica; a loop left pending would be reported with its stack."""

    async def run():
        ing = make_ingress(FakeAllocator(), FakeEngine())
        ing._ensure_lease()
        cfg = AllocatorConfig(policy="clear", budget={"mode": "per_query", "tokens_per_query": 400, "window_queries": 50})
        alloc = Allocator(cfg, max_completion_tokens=8192, metrics=False)
        await alloc.renew("owner")  # starts the sweeper
        lease, sweeper = ing._lease_task, alloc._sweeper
        await asyncio.sleep(0)
        assert not lease.done() and not sweeper.done()
        ing.__del__()
        alloc.__del__()
        await asyncio.gather(lease, sweeper, return_exceptions=True)
        return lease, sweeper

    lease, sweeper = asyncio.run(run())
    assert lease.cancelled() and sweeper.cancelled()


def test_a_remote_error_stand_in_looks_like_rays():
    """The stand-in above carries its cause like a Ray error, so the ingress unwraps it the same way."""
    from deployments.ingress import _engine_failure

    bad = BadRequestError("x")
    assert _engine_failure(_RemoteError(bad)) is bad
    assert isinstance(_engine_failure(_RemoteError(RuntimeError("y"))), ClearError)
