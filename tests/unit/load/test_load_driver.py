"""The load-test driver against an in-process fake OpenAI server (no Ray)."""

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from load_tests.driver import LoadConfig, run_load
from load_tests.grading import check_answer, last_boxed, solved
from load_tests.report import side_by_side, summarize
from load_tests.traffic import PlannedRequest


def fake_server(cap: int) -> FastAPI:
    """Abandons odd sample indices with 429; replays the rest cut at ``cap``."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        j = body["clear_sample_index"]
        if j % 2:
            return JSONResponse({"error": {"type": "budget_abandoned", "shadow_price": 0.25}}, status_code=429,
                                headers={"Retry-After": "1"})
        tokens = 100 * (j + 1)
        gen = min(cap, tokens)

        async def events():
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 5}}],
                                         "clear": {"allocated_tokens": cap, "shadow_price": 0.1}}) + "\n\n"
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {},
                                                      "finish_reason": "stop" if gen == tokens else "length"}],
                                         "clear": {"replay": {"solved": gen == tokens}}}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": gen}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def plan(n):
    return [PlannedRequest(i, f"p{i}", i % 6, "2+2?", "4", 100 * (i % 6 + 1), True, "easy") for i in range(n)]


@pytest.mark.parametrize("mode", ["concurrency", "rate"])
def test_driver_records_outcomes_and_tokens(mode):
    cfg = LoadConfig(base_url="http://fake", mode=mode, concurrency=4, rate_rps=500.0, max_requests=24)
    recs = asyncio.run(run_load(cfg, plan(30), transport=httpx.ASGITransport(app=fake_server(cap=300))))
    assert len(recs) == 24 and [r.index for r in recs] == list(range(24))
    for r in recs:
        j = r.index % 6
        if j % 2:
            assert r.status == "abandoned" and r.http_status == 429 and r.shadow_price == 0.25 and not r.solved
        else:
            assert r.status == "ok" and r.completion_tokens == min(300, 100 * (j + 1))
            assert r.solved == (100 * (j + 1) <= 300) and r.allocated_tokens == 300
            assert r.ttft_s is not None and r.ttft_s <= r.latency_s
    s = summarize(recs, wall_s=2.0)
    assert s["abandoned_429"] == 12 and s["solved"] == 8 and s["accuracy"] == 8 / 24
    assert s["tokens_generated"] == 4 * (100 + 300 + 300)
    assert "| accuracy | 33.3% |" in side_by_side({"x": s})


def test_math_verify_grades_equivalent_forms():
    import math_verify  # noqa: F401  (a dev dependency: the real-engine grader must be there)

    assert check_answer(r"so the answer is $\boxed{0.5}$", r"\frac{1}{2}")
    assert not check_answer(r"so the answer is $\boxed{0.4}$", r"\frac{1}{2}")


def test_grading():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{42}") == "42"
    assert check_answer(r"The answer is $\boxed{42}$.", "42")
    assert not check_answer(r"The answer is $\boxed{41}$.", "42")
    assert solved({"replay": {"solved": True}}, "", "irrelevant") is True
    assert solved({"replay": {"solved": False}}, r"\boxed{4}", "4") is False
