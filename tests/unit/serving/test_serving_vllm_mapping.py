"""The vLLM engine's request mapping, on CPU against a fake LLMServer handle."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.engines.base import EngineRequest
from deployments.config import VLLMEngineConfig
from deployments.engines.vllm import VLLMEngine, openai_body
from deployments.errors import EngineError


class FakeStream:
    def __init__(self, items):
        self.items = items

    def __aiter__(self):
        async def gen():
            for it in self.items:
                yield it

        return gen()


class FakeMethod:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def options(self, **kw):
        self.owner.options = kw
        return self

    def remote(self, request):
        self.owner.calls.append((self.name, request))
        return FakeStream(self.owner.items)


class FakeLLMHandle:
    """Stands in for the LLMServer handle: records requests, replays SSE batches."""

    def __init__(self, items):
        self.items, self.calls, self.options = items, [], None
        self.chat = FakeMethod(self, "chat")
        self.completions = FakeMethod(self, "completions")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def chat_chunk(text, total, finish=None):
    return sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], "usage": {"completion_tokens": total}})


def req(kind="chat", cap=300, **kw):
    return EngineRequest(
        request_id="r", kind=kind, prompt="Solve x+1=2", messages=({"role": "user", "content": "Solve x+1=2"},) if kind == "chat" else None,
        cap_tokens=cap, model="qwen", sampling={"temperature": 0.7}, **kw,
    )


async def run(engine, r):
    return [c async for c in engine.generate(r)]


def test_cap_becomes_max_tokens_and_stream_is_translated():
    items = [[chat_chunk("x", 1), chat_chunk(" =", 2)], [chat_chunk(" 1", 3, "stop"), "data: [DONE]\n\n"]]
    handle = FakeLLMHandle(items)
    engine = VLLMEngine(handle, VLLMEngineConfig(model_source="Qwen/Qwen2.5-7B"), "qwen", request_factory=lambda kind, body: body)
    chunks = asyncio.run(run(engine, req(cap=300)))
    (name, sent), = handle.calls
    assert name == "chat" and handle.options == {"stream": True}
    assert sent["max_tokens"] == 300 and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["messages"][0]["content"] == "Solve x+1=2" and sent["temperature"] == 0.7
    assert "".join(c.text for c in chunks) == "x = 1"
    assert sum(c.tokens for c in chunks) == 3
    assert chunks[-1].finish_reason == "stop"


def test_completion_mapping_and_ignore_eos():
    body = openai_body(req(kind="completion", cap=17), ignore_eos=True)
    assert body["prompt"] == "Solve x+1=2" and body["max_tokens"] == 17 and body["ignore_eos"] is True
    assert "messages" not in body


def test_engine_error_payload_raises():
    handle = FakeLLMHandle([sse({"error": {"message": "CUDA OOM", "type": "InternalServerError"}})])
    engine = VLLMEngine(handle, VLLMEngineConfig(model_source="m"), "qwen", request_factory=lambda k, b: b)
    with pytest.raises(EngineError, match="CUDA OOM"):
        asyncio.run(run(engine, req()))


@pytest.mark.parametrize("cap", [50, 10_000])
def test_trace_replay_asks_for_the_recorded_work_and_scores_from_the_trace(main_pool, cap):
    """replay: max_tokens = min(cap, recorded length) with ignore_eos; solved iff cap >= length and correct."""
    from tests.conftest import MAIN_POOL

    problem = next(p for p in main_pool if 100 < p.samples[0].tokens < 2000)
    sample = problem.samples[0]
    want = min(cap, sample.tokens)
    handle = FakeLLMHandle([[chat_chunk("t" * want, want, "length")]])
    cfg = VLLMEngineConfig(model_source="m", advanced={"replay": True, "trace_path": str(MAIN_POOL)})
    engine = VLLMEngine(handle, cfg, "qwen", request_factory=lambda k, b: b)
    r = EngineRequest(request_id="r", kind="chat", prompt=problem.problem, messages=None, cap_tokens=cap,
                      model="qwen", sample_index=0)
    chunks = asyncio.run(run(engine, r))
    (_, sent), = handle.calls
    assert sent["max_tokens"] == want and sent["ignore_eos"] is True
    info = chunks[-1].info
    assert info["problem_id"] == problem.id and info["matched"] and info["engine"] == "vllm"
    assert info["solved"] == (cap >= sample.tokens and sample.correct)
    assert chunks[-1].finish_reason == ("stop" if cap >= sample.tokens and not sample.truncated else "length")


def test_a_replay_cut_short_by_the_engine_is_scored_on_what_it_generated(main_pool):
    from tests.conftest import MAIN_POOL

    problem = next(p for p in main_pool if p.samples[0].correct and 100 < p.samples[0].tokens < 2000)
    handle = FakeLLMHandle([[chat_chunk("t", 10, "abort")]])  # vLLM stopped after 10 tokens
    engine = VLLMEngine(handle, VLLMEngineConfig(model_source="m", advanced={"replay": True, "trace_path": str(MAIN_POOL)}), "qwen",
                        request_factory=lambda k, b: b)
    r = EngineRequest(request_id="r", kind="chat", prompt=problem.problem, messages=None, cap_tokens=8000,
                      model="qwen", sample_index=0)
    chunks = asyncio.run(run(engine, r))
    assert sum(c.tokens for c in chunks) == 10 and chunks[-1].info["solved"] is False


def test_an_out_of_range_sample_is_a_bad_request_before_the_engine(main_pool):
    from deployments.errors import BadRequestError
    from tests.conftest import MAIN_POOL

    handle = FakeLLMHandle([])
    engine = VLLMEngine(handle, VLLMEngineConfig(model_source="m", advanced={"replay": True, "trace_path": str(MAIN_POOL)}), "qwen",
                        request_factory=lambda k, b: b)
    r = EngineRequest(request_id="r", kind="chat", prompt=main_pool[0].problem, messages=None, cap_tokens=10,
                      model="qwen", sample_index=999)
    with pytest.raises(BadRequestError, match="clear_sample_index"):
        asyncio.run(run(engine, r))
    assert handle.calls == []


def test_a_non_streaming_request_is_answered_whole_with_its_usage():
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x = 1"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
    handle = FakeLLMHandle([whole])
    engine = VLLMEngine(handle, VLLMEngineConfig(model_source="m"), "qwen", request_factory=lambda k, b: b)
    chunks = asyncio.run(run(engine, req(cap=300, stream=False)))
    (_, sent), = handle.calls
    assert sent["stream"] is False and "stream_options" not in sent
    assert "".join(c.text for c in chunks) == "x = 1" and sum(c.tokens for c in chunks) == 4
    assert chunks[-1].finish_reason == "stop"
