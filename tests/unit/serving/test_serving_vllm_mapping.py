"""The request vLLM gets and the answer the client gets back, on CPU against a fake LLMServer handle.

The requests are parsed by vLLM's own models (deployments.vllm_protocol); the
answers are what Ray Serve LLM yields (lists of ``data:`` lines when streaming,
one response object otherwise), written here by hand in vLLM's format.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.config import VLLMEngineConfig
from deployments.engines.vllm import VLLMEngine
from deployments.errors import BadRequestError, EngineRefusedError
from deployments.passthrough import StreamRelay, refusal_in, whole_answer
from deployments.vllm_protocol import parse_vllm
from tests.fakes import FakeLLMHandle

LIMIT = 4096


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def chat(**fields):
    return parse_vllm("chat", {"model": "qwen", "messages": [{"role": "user", "content": "Solve x+1=2"}], **fields}, LIMIT)


def engine(handle=None, **cfg) -> VLLMEngine:
    return VLLMEngine(handle or FakeLLMHandle(), VLLMEngineConfig(model_source="m", **cfg), "qwen")


# -- the request vLLM gets -------------------------------------------------------------


def test_only_the_cap_changes_what_the_client_asked_for():
    req = chat(max_tokens=500, temperature=0.7, top_k=5, logprobs=True, top_logprobs=2, n=3, seed=11,
               response_format={"type": "json_object"}, stream=True)
    sent, plan = engine().engine_request(req, "chatcmpl-abc123", cap=40)
    assert plan is None
    assert sent.max_completion_tokens == 40 and sent.model_dump()["max_tokens"] == 40
    assert (sent.temperature, sent.top_k, sent.logprobs, sent.top_logprobs, sent.n, sent.seed) == (0.7, 5, True, 2, 3, 11)
    assert sent.response_format.type == "json_object"
    # Added for the books: usage on every chunk; the ingress's request id (vLLM's answer id is built from it).
    assert sent.stream_options.include_usage and sent.stream_options.continuous_usage_stats
    assert sent.request_id == "abc123" and not sent.ignore_eos
    # The client's own request object is untouched.
    assert req.request.max_completion_tokens is None and req.request.stream_options is None


def test_a_completion_gets_max_tokens_and_a_whole_answer_asks_no_stream_usage():
    req = parse_vllm("completion", {"model": "qwen", "prompt": "2+2=", "max_tokens": 90, "echo": True,
                                    "logprobs": 1}, LIMIT)
    sent, _ = engine().engine_request(req, "cmpl-x", cap=12)
    assert type(sent).__name__ == "CompletionRequest"
    assert sent.max_tokens == 12 and sent.echo and sent.logprobs == 1 and sent.stream_options is None


def test_a_thinking_budget_and_ignore_eos_are_set_when_asked():
    sent, _ = engine(advanced={"ignore_eos": True}).engine_request(chat(), "chatcmpl-x", cap=300, thinking_tokens=44)
    assert sent.thinking_token_budget == 44 and sent.ignore_eos is True and sent.max_completion_tokens == 300


def test_content_parts_are_materialised_so_the_request_pickles():
    import pickle

    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    sent, _ = engine().engine_request(req, "chatcmpl-x", cap=5)
    assert pickle.loads(pickle.dumps(sent)).messages[0]["content"][1]["text"] == "b"


@pytest.mark.parametrize("cap", [50, 10_000])
def test_trace_replay_asks_for_the_recorded_work(main_pool, cap):
    """replay: max_tokens = min(cap, recorded length) with ignore_eos."""
    from tests.conftest import MAIN_POOL

    problem = next(p for p in main_pool if 100 < p.samples[0].tokens < 2000)
    req = parse_vllm("chat", {"model": "qwen", "messages": [{"role": "user", "content": problem.problem}],
                              "clear_sample_index": 0}, 16384)
    sent, plan = engine(advanced={"replay": True, "trace_path": str(MAIN_POOL)}).engine_request(req, "chatcmpl-x", cap)
    assert sent.max_completion_tokens == min(cap, problem.samples[0].tokens) and sent.ignore_eos is True
    assert plan.problem.id == problem.id and plan.matched


def test_forward_calls_the_method_of_the_request_and_cancels_when_the_client_leaves():
    handle = FakeLLMHandle([["data: {}\n\n"], ["data: {}\n\n"]])
    eng = engine(handle)
    sent, _ = eng.engine_request(chat(stream=True), "chatcmpl-x", cap=5)

    async def leave_after_one():
        gen = eng.forward(sent)
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(leave_after_one())
    (name, _), = handle.calls
    assert name == "chat" and handle.options == {"stream": True}


# -- the answer the client gets ------------------------------------------------------------


def stopped(finish):
    return "natural_stop" if finish == "stop" else "clear_cap"


def test_a_whole_answer_keeps_vllms_fields_and_adds_the_clear_object():
    from ray.serve.llm.openai_api_models import ChatCompletionResponse

    response = ChatCompletionResponse.model_validate({
        "id": "chatcmpl-vllm", "created": 1, "model": "qwen",
        "choices": [{"index": i, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            "finish_reason": "tool_calls" if i else "length", "logprobs": None} for i in range(2)],
        "usage": {"prompt_tokens": 9, "completion_tokens": 23, "total_tokens": 32}})
    body, tally = whole_answer(response, "chatcmpl-ours", {"allocated_tokens": 40}, stopped)
    assert body["id"] == "chatcmpl-ours" and tally.tokens == 23
    assert body["choices"][1]["message"]["tool_calls"][0]["function"]["arguments"] == "{\"a\": 1}"
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "tool_calls"]
    # One choice cut by its cap: the group's answer says the cap cut it.
    assert body["clear"] == {"allocated_tokens": 40, "stopped_by": "clear_cap"}
    assert body["usage"]["total_tokens"] == 32


def test_an_error_response_is_refused_with_vllms_status():
    from ray.serve.llm.openai_api_models import ErrorResponse

    err = ErrorResponse.model_validate({"error": {"message": "This model's maximum context length is 4096 tokens",
                                                  "type": "BadRequestError", "param": None, "code": 400}})
    with pytest.raises(EngineRefusedError) as got:
        whole_answer(err, "r", {}, stopped)
    assert got.value.http_status == 400 and "maximum context length" in str(got.value)
    assert got.value.error_type == "invalid_request_error"
    assert refusal_in([err]).http_status == 400
    line = sse({"error": {"message": "thinking_token_budget is set but reasoning_config is not configured",
                          "type": "BadRequestError", "param": None, "code": 400}})
    assert refusal_in([line, "data: [DONE]\n\n"]).http_status == 400
    assert refusal_in(["data: {\"choices\": []}\n\n"]) is None


def chunk(index, text=None, finish=None, usage=None, role=False):
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    out = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
           "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        out["usage"] = {"prompt_tokens": 9, "completion_tokens": usage, "total_tokens": 9 + usage}
    return sse(out)


def stream_of_two_choices():
    """vLLM's stream for n=2 with continuous usage: per-chunk usage counts that chunk's choice so far."""
    final = sse({"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
                 "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}})
    return [
        [chunk(0, role=True, usage=0), chunk(1, role=True, usage=0)],
        [chunk(0, "a", usage=1), chunk(1, "b", usage=1), chunk(0, "c", usage=2), chunk(1, "d", usage=2)],
        [chunk(0, "e", usage=3, finish="length"), chunk(1, "f", usage=3), chunk(1, "g", usage=4, finish="stop")],
        [final, "data: [DONE]\n\n"],
    ]


def relay_all(relay, items):
    lines = [line for item in items for line in relay.feed(item)]
    return [json.loads(x[len("data: "):]) for x in lines]


@pytest.mark.parametrize("include_usage,continuous", [(False, False), (True, False), (True, True)])
def test_a_stream_is_relayed_with_usage_only_where_the_client_asked(include_usage, continuous):
    relay = StreamRelay("chatcmpl-ours", {"allocated_tokens": 8}, stopped, include_usage=include_usage,
                        continuous_usage=continuous)
    chunks = relay_all(relay, stream_of_two_choices())
    assert relay.done and relay.tally.tokens == 7 and relay.tally.per_choice == {0: 3, 1: 4}
    assert all(c["id"] == "chatcmpl-ours" for c in chunks)
    assert ("usage" in chunks[1]) == continuous
    final_usage = [c for c in chunks if not c["choices"]]
    assert len(final_usage) == int(include_usage)
    text = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "ace", 1: "bdfg"}
    # clear: on the first chunk, and on each chunk where a choice finishes, with who stopped that choice.
    assert chunks[0]["clear"] == {"allocated_tokens": 8}
    ends = [c["clear"]["stopped_by"] for c in chunks[1:] if "clear" in c]
    assert ends == ["clear_cap", "natural_stop"]


def test_a_client_that_leaves_is_charged_what_each_choice_generated_so_far():
    relay = StreamRelay("r", {}, stopped, include_usage=False, continuous_usage=False)
    relay_all(relay, stream_of_two_choices()[:2])  # no final usage yet
    assert relay.tally.tokens == 4


def test_an_error_line_mid_stream_is_raised_after_what_was_generated():
    relay = StreamRelay("r", {}, stopped, include_usage=False, continuous_usage=False)
    relay_all(relay, stream_of_two_choices()[:2])
    with pytest.raises(EngineRefusedError, match="GenerationError"):
        relay.feed([sse({"error": {"message": "GenerationError", "type": "InternalServerError", "code": 500}})])
    assert relay.tally.tokens == 4


def test_replay_reports_the_traces_finish_reason():
    relay = StreamRelay("r", {}, stopped, include_usage=False, continuous_usage=False,
                        on_finish=lambda reason, tokens: ("stop", {"replay": {"tokens": tokens}}))
    chunks = relay_all(relay, [[chunk(0, "x", usage=5, finish="length")]])
    assert chunks[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[0]["clear"]["replay"] == {"tokens": 5} and chunks[0]["clear"]["stopped_by"] == "natural_stop"


def test_a_tool_without_a_name_is_refused_by_vllms_own_model():
    with pytest.raises(BadRequestError, match="name"):
        chat(tools=[{"type": "function", "function": {"parameters": {}}}], tool_choice="required")


def test_a_whole_reasoning_answer_reports_its_thought_and_hides_the_token_ids_it_was_not_asked_for():
    end = 151649
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "qwen", "prompt_token_ids": [1, 2],
            "choices": [{"index": 0, "message": {"role": "assistant", "reasoning": "abc", "content": "d"},
                         "finish_reason": "length", "token_ids": [5, 6, 7, end, 8, 9]},
                        {"index": 1, "message": {"role": "assistant", "reasoning": "abcdef", "content": None},
                         "finish_reason": "length", "token_ids": [5, 6, 7, 8, 9, 10]}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14,
                      "completion_tokens_details": {"reasoning_tokens": 0}}}
    out, tally = whole_answer(body, "r", {}, stopped, thought_end_id=end, keep_token_ids=False)
    # Choice 0 thought for 3 tokens before </think>; choice 1 never ended its thought: all 6.
    assert tally.reasoning == {0: 3, 1: 6} and out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 9
    assert "prompt_token_ids" not in out and all("token_ids" not in c for c in out["choices"])


def test_a_reasoning_stream_reports_the_tokens_up_to_each_choices_last_thought_delta():
    def delta_chunk(index, usage, **delta):
        return sse({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
                    "choices": [{"index": index, "delta": delta, "finish_reason": None}],
                    "usage": {"prompt_tokens": 2, "completion_tokens": usage, "total_tokens": 2 + usage}})

    final = sse({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "qwen", "choices": [],
                 "usage": {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11,
                           "completion_tokens_details": {"reasoning_tokens": 0}}})
    relay = StreamRelay("r", {}, stopped, include_usage=True, continuous_usage=False, count_reasoning=True)
    # vLLM sends no chunk for the lone </think> token: the count jumps by 2 at the first answer delta.
    chunks = relay_all(relay, [[delta_chunk(0, 1, reasoning="a"), delta_chunk(0, 2, reasoning="b"),
                                delta_chunk(0, 4, content="c"), delta_chunk(0, 9, content="d")], [final]])
    assert relay.tally.reasoning == {0: 2}
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2


def test_a_streamed_tool_call_cut_by_its_cap_ends_length():
    relay = StreamRelay("r", {}, stopped, include_usage=False, continuous_usage=False, cap=25)
    chunks = relay_all(relay, [[chunk(0, "x", usage=24), chunk(0, "y", usage=25, finish="tool_calls")]])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["clear"]["stopped_by"] == "clear_cap"
    whole = StreamRelay("r", {}, stopped, include_usage=False, continuous_usage=False, cap=25)
    done = relay_all(whole, [[chunk(0, "x", usage=20, finish="tool_calls")]])
    assert done[-1]["choices"][0]["finish_reason"] == "tool_calls"
