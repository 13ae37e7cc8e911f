"""Replay engine and token codec, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from deployments.engines.base import EngineRequest
from deployments.config import ReplayEngineConfig
from deployments.engines.replay import ReplayEngine
from deployments.engines.workload import SYNTHETIC_PREFIX, synthetic_problems
from deployments.errors import BadRequestError, EngineError
from deployments.tokens import TokenCodec
from tests.conftest import MAIN_POOL, SHARED

QWEN = SHARED / "data" / "tokenizer" / "qwen.tiktoken"


def make_request(prompt: str, cap: int, sample: int | None = None, rid: str = "r1") -> EngineRequest:
    return EngineRequest(request_id=rid, kind="chat", prompt=prompt, messages=None, cap_tokens=cap, model="m", sample_index=sample)


async def collect(engine: ReplayEngine, req: EngineRequest):
    return [c async for c in engine.generate(req)]


def fast(trace_path=None, tokenizer_path=None, **advanced) -> ReplayEngineConfig:
    return ReplayEngineConfig(trace_path=trace_path, tokenizer_path=tokenizer_path,
                              advanced={"decode_tokens_per_s": 1e9, "time_to_first_token_s": 0.0, **advanced})


def test_synthetic_workload_is_labelled_and_deterministic():
    a, b = synthetic_problems(40, seed=1), synthetic_problems(40, seed=1)
    assert a == b
    assert all(p.id.startswith("synthetic/") and p.problem.startswith(SYNTHETIC_PREFIX) for p in a)
    assert {p.tier for p in a} == {"easy", "moderate", "hard", "very_hard"}


@pytest.mark.parametrize("cap_delta, finish", [(-50, "length"), (0, "stop"), (100, "stop")])
def test_replay_cuts_at_the_cap_with_exact_tokens(main_pool, cap_delta, finish):
    engine = ReplayEngine(fast(trace_path=str(MAIN_POOL), tokenizer_path=str(QWEN), stream_chunk_tokens=7))
    prob = next(p for p in main_pool if p.dataset == "gsm8k" and p.samples[0].correct and not p.samples[0].truncated)
    tokens = prob.samples[0].tokens
    chunks = asyncio.run(collect(engine, make_request(prob.problem, tokens + cap_delta)))
    n = min(tokens, tokens + cap_delta)
    assert sum(c.tokens for c in chunks) == n
    text = "".join(c.text for c in chunks)
    assert engine.codec.count(text) == n  # exact cut in Qwen2.5 tokens
    assert prob.response.startswith(text)
    last = chunks[-1]
    assert last.finish_reason == finish and all(c.finish_reason is None for c in chunks[:-1])
    assert last.info["solved"] == (cap_delta >= 0)
    assert last.info["matched"] and last.info["problem_id"] == prob.id


def test_other_samples_get_filler_of_the_recorded_length(main_pool):
    engine = ReplayEngine(fast(trace_path=str(MAIN_POOL)))
    prob = next(p for p in main_pool if len(p.samples) == 8)
    j = 3
    s = prob.samples[j]
    chunks = asyncio.run(collect(engine, make_request(prob.problem, 100_000, sample=j)))
    assert sum(c.tokens for c in chunks) == s.tokens
    assert chunks[-1].info["solved"] == s.correct
    assert chunks[-1].info["sample_index"] == j
    with pytest.raises(BadRequestError):
        engine.plan(make_request(prob.problem, 10, sample=8))


def test_unknown_prompt_is_served_from_a_stable_problem():
    engine = ReplayEngine(fast())
    a = engine.plan(make_request("Hello!", 20))[2]
    b = engine.plan(make_request("Hello!", 20))[2]
    assert a == b and not a["matched"] and a["synthetic"]


def test_concurrency_and_pace():
    engine = ReplayEngine(ReplayEngineConfig(advanced=dict(decode_tokens_per_s=1000.0, time_to_first_token_s=0.0,
                                                                  stream_chunk_tokens=10, max_concurrent_requests=1)))
    prompt = engine.workload.problems[0].problem  # easy, > 50 tokens

    async def two():
        import time

        t0 = time.perf_counter()
        await asyncio.gather(collect(engine, make_request(prompt, 50, rid="a")), collect(engine, make_request(prompt, 50, rid="b")))
        return time.perf_counter() - t0

    elapsed = asyncio.run(two())
    assert elapsed >= 2 * 0.04  # 4 sleeps of 10 ms each, one request at a time


def test_injected_failure_raises_engine_error():
    engine = ReplayEngine(fast(fail_probability=1.0, stream_chunk_tokens=4))
    prompt = engine.workload.problems[1].problem
    with pytest.raises(EngineError):
        asyncio.run(collect(engine, make_request(prompt, 200)))


def test_approximate_codec_round_trips_and_pads():
    codec = TokenCodec()
    text = "Let x = 12.5; then 2x = 25."
    assert "".join(codec.pieces(text)) == text
    cut = codec.cut(text, 100)
    assert len(cut) == 100 and "".join(cut).startswith(text)
