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
