"""The books of a relayed vLLM answer (deployments.ingress on the vLLM engine), against a fake LLMServer handle:
every reservation settles once, with what the client received; vLLM's refusals are refunded whole."""

from __future__ import annotations

import asyncio
import json

from deployments.config import AppConfig
from deployments.ingress import Ingress
from tests.factories import app_args
from tests.fakes import FakeAllocator, FakeLLMHandle, FakePredictor, make_request

MODEL = "clear-tiny"


def vllm_ingress(items, allocator=None) -> tuple[Ingress, FakeAllocator, FakeLLMHandle]:
    alloc = allocator or FakeAllocator(cap=60)
    handle = FakeLLMHandle(items)
    cfg = AppConfig.model_validate(app_args(model_name=MODEL, engine={"kind": "vllm", "model_source": "m"},
                                                predictor={"placement": "deployment"}))
    return Ingress(cfg, FakePredictor(), alloc, handle, metrics=False), alloc, handle


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def chunk(index, text, usage, finish=None):
    return sse({"id": "v", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}})


def whole(n_tokens):
    from ray.serve.llm.openai_api_models import ChatCompletionResponse

    return ChatCompletionResponse.model_validate({
        "id": "v", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": n_tokens, "total_tokens": 3 + n_tokens}})


def body(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Solve x+1=2"}], **fields}


async def _drain(response):
    if hasattr(response, "body_iterator"):
        return [part async for part in response.body_iterator]
    return response


def run(ing, b):
    async def go():
        resp = await ing._complete(make_request(b), "chat")
        out = await _drain(resp)
        await asyncio.sleep(0)  # background settles run
        return resp, out

    return asyncio.run(go())


def test_a_whole_answer_is_charged_its_usage_once():
    ing, alloc, handle = vllm_ingress([whole(17)], FakeAllocator(cap=60))
    _, out = run(ing, body(max_tokens=40))
    assert out["usage"]["completion_tokens"] == 17 and out["clear"]["allocated_tokens"] == 40
    assert alloc.settled == [(alloc.reserved[0], 17)] and alloc.failed == [False]
    (_, sent), = handle.calls
    assert sent.max_completion_tokens == 40


def test_what_vllm_refuses_after_the_reservation_is_refunded_whole_with_its_status():
    from ray.serve.llm.openai_api_models import ErrorResponse

    err = ErrorResponse.model_validate({"error": {"message": "This model's maximum context length is 16 tokens",
                                                  "type": "BadRequestError", "param": None, "code": 400}})
    for stream in (False, True):
        ing, alloc, _ = vllm_ingress([[err]] if stream else [err])
        resp, _ = run(ing, body(max_tokens=40, stream=stream))
        assert resp.status_code == 400
        assert "maximum context length" in json.loads(resp.body)["error"]["message"]
        assert alloc.settled == [(alloc.reserved[0], 0)] and alloc.failed == [True]


def test_an_error_mid_stream_is_charged_what_each_choice_generated_before_it():
    error = sse({"error": {"message": "GenerationError", "type": "InternalServerError", "code": 500}})
    ing, alloc, _ = vllm_ingress([[chunk(0, "a", 4), chunk(1, "b", 3)], [error, "data: [DONE]\n\n"]])
    resp, parts = run(ing, body(max_tokens=10, n=2, stream=True))
    assert resp.status_code == 200
    events = [p for p in parts if p.startswith("data: {")]
    assert json.loads(events[-1][len("data: "):])["error"]["message"].startswith("GenerationError")
    assert parts[-1] == "data: [DONE]\n\n"
    assert alloc.settled == [(alloc.reserved[0], 7)] and alloc.failed == [True]


def test_n_choices_enter_the_market_as_one_group_and_each_gets_its_share():
    ing, alloc, handle = vllm_ingress([whole(36)])
    _, out = run(ing, body(max_tokens=12, n=3))
    (entry,) = alloc.entries
    assert (entry["group"], entry["client_cap"]) == (3, 36)
    assert entry["threshold"] == 3 * 100.0  # the fake predictor's 100 tokens, per choice
    (_, sent), = handle.calls
    assert sent.n == 3 and sent.max_completion_tokens == 12
    assert (out["clear"]["choices"], out["clear"]["cap_per_choice_tokens"]) == (3, 12)


def test_a_structured_request_carries_its_floor_into_the_market():
    ing, alloc, _ = vllm_ingress([whole(5)])
    run(ing, body(max_tokens=500, n=2, response_format={"type": "json_object"}))
    assert alloc.entries[0]["floor_tokens"] == 2 * 64  # allocator.advanced.structured_floor_tokens per choice
    ing, alloc, _ = vllm_ingress([whole(5)])
    run(ing, body(max_tokens=500))
    assert alloc.entries[0]["floor_tokens"] == 1
