"""The whole OpenAI and vLLM API through the budget on REAL vLLM (CPU), each call compared with the same call
on bare Ray Serve LLM (the session's fleet, ``build_openai_app``) serving the same engine.

The CLEAR graphs here attach to the fleet's replicas and price with ``uniform`` caps large enough that the
cap a client sees is its own ``max_tokens``: the market is not under test, the API is (groups, floors and
thinking budgets are priced in tests/unit/core/test_groups.py and tests/unit/serving/test_market_entry.py).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.cluster.conftest import (FLEET_APP, FLEET_REASONING_CONTEXT, FLEET_TOOLS_CONTEXT, REASONING_MODEL,
                                    TOOLS_MODEL)
from tests.factories import app_args

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

TOOLS_APP, REASONING_APP = "vllm-api", "vllm-r1"
ANSWER_TOKENS = 16
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                            "celsius": {"type": "boolean"}},
           "required": ["city", "celsius"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ANSWER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"type": "string", "enum": ["red", "blue"]}},
                 "required": ["ok", "color"], "additionalProperties": False}


def _graph(model: str, model_dir, context: int, **engine) -> dict:
    return app_args(
        model_name=model, context_limit_tokens=context,
        allocator={"policy": "uniform", "budget": {"tokens_per_query": 4096, "window_queries": 100_000}},
        engine={"kind": "vllm", "model_source": str(model_dir), "advanced": {"attach_to_app": FLEET_APP}, **engine},
    )


@pytest.fixture(scope="module")
def urls(cluster, vllm_fleet):
    apps = cluster.deploy_many({
        TOOLS_APP: _graph(TOOLS_MODEL, vllm_fleet.tools_model_dir, FLEET_TOOLS_CONTEXT),
        REASONING_APP: _graph(REASONING_MODEL, vllm_fleet.reasoning_model_dir, FLEET_REASONING_CONTEXT,
                              answer_tokens=ANSWER_TOKENS),
    })
    yield apps | {"anchor": vllm_fleet.anchor}
    cluster.delete(TOOLS_APP, REASONING_APP, wait=False)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)


def books(base: str) -> dict:
    s = httpx.get(f"{base}/v1/clear/status", timeout=30).json()
    return {k: s[k] for k in ("allocated_tokens_total", "generated_tokens_total", "refunded_tokens_total",
                              "reserved_tokens", "in_flight_reservations")}


def moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def both(urls, call):
    """The same call through CLEAR and on bare Ray Serve LLM."""
    return call(client(urls[TOOLS_APP])), call(client(urls["anchor"]))


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_come_back_with_arguments_of_the_tools_schema(urls, choice):
    before = books(urls[TOOLS_APP])
    ours, anchor = both(urls, lambda c: c.chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=300, seed=7))
    for r in (ours, anchor):
        calls = r.choices[0].message.tool_calls
        assert calls and all(call.function.name == "get_weather" for call in calls)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert ours.choices[0].finish_reason == anchor.choices[0].finish_reason
    assert ours.model_extra["clear"]["stopped_by"] == "natural_stop"
    assert moved(before, books(urls[TOOLS_APP]))["generated_tokens_total"] == ours.usage.completion_tokens


def test_a_json_schema_answer_is_an_object_of_the_schema(urls):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    ours, anchor = both(urls, lambda c: c.chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, response_format=fmt, max_tokens=200))
    for r in (ours, anchor):
        jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER_SCHEMA)
        assert r.choices[0].finish_reason == "stop"


def test_logprobs_return_two_alternatives_per_token(urls):
    ours, anchor = both(urls, lambda c: c.chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, logprobs=True, top_logprobs=2, max_tokens=6,
        extra_body={"ignore_eos": True}))
    for r in (ours, anchor):
        tokens = r.choices[0].logprobs.content
        assert len(tokens) == 6 and all(len(t.top_logprobs) == 2 for t in tokens)


def test_n_choices_are_one_decision_charged_what_all_of_them_generated(urls):
    before = books(urls[TOOLS_APP])
    ours, anchor = both(urls, lambda c: c.chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, n=3, max_tokens=12, extra_body={"ignore_eos": True}))
    for r in (ours, anchor):
        assert len(r.choices) == 3 and r.usage.completion_tokens == 36
    clear = ours.model_extra["clear"]
    assert (clear["choices"], clear["cap_per_choice_tokens"], clear["allocated_tokens"]) == (3, 12, 36)
    d = moved(before, books(urls[TOOLS_APP]))
    assert d["generated_tokens_total"] == ours.usage.completion_tokens == 36
    assert d["allocated_tokens_total"] == 36 and d["reserved_tokens"] == 0

    # Streamed: vLLM's usage on each chunk is per choice; the books charge the sum, the client sees its usage.
    before = books(urls[TOOLS_APP])
    chunks = list(client(urls[TOOLS_APP]).chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, n=2, max_tokens=9, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 18
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    assert moved(before, books(urls[TOOLS_APP]))["generated_tokens_total"] == 18


def test_a_tool_without_a_name_is_refused_before_the_budget_as_on_bare_vllm(urls):
    body = {"model": TOOLS_MODEL, "messages": QUESTION, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"parameters": WEATHER}}]}
    before = httpx.get(f"{urls[TOOLS_APP]}/v1/clear/status", timeout=30).json()
    ours = httpx.post(f"{urls[TOOLS_APP]}/v1/chat/completions", json=body, timeout=60)
    anchor = httpx.post(f"{urls['anchor']}/v1/chat/completions", json=body, timeout=60)
    assert ours.status_code == anchor.status_code == 400
    assert "name" in ours.json()["error"]["message"] and ours.json()["error"]["param"] == "tools"
    after = httpx.get(f"{urls[TOOLS_APP]}/v1/clear/status", timeout=30).json()
    assert after == before | {k: after[k] for k in after if k in ("uptime_s", "now", "ingress")}


def test_a_structured_answer_cut_by_its_cap_says_so(urls):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    r = client(urls[TOOLS_APP]).chat.completions.create(model=TOOLS_MODEL, messages=QUESTION, response_format=fmt,
                                                        max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.model_extra["clear"]["stopped_by"] == "client_max_tokens"
    # A streamed tool call cut mid-arguments: vLLM itself streams "tool_calls" here; the client gets "length".
    chunks = list(client(urls[TOOLS_APP]).chat.completions.create(
        model=TOOLS_MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=25, stream=True,
        stream_options={"include_usage": True}))
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"] and chunks[-1].usage.completion_tokens == 25


def test_a_thinking_budget_is_not_a_truncation(urls, vllm_fleet):
    """The cap is the thinking budget: exactly c thought tokens, the end marker, then the answer allowance."""
    from transformers import AutoTokenizer

    end = AutoTokenizer.from_pretrained(str(vllm_fleet.reasoning_model_dir)).convert_tokens_to_ids("</think>")
    base = urls[REASONING_APP]
    for c in (10, 40):
        before = books(base)
        r = client(base).chat.completions.create(
            model=REASONING_MODEL, messages=QUESTION, max_tokens=500,
            extra_body={"thinking_token_budget": c, "ignore_eos": True, "return_token_ids": True})
        choice, clear = r.choices[0], r.model_extra["clear"]
        ids = choice.model_extra["token_ids"]
        assert ids.index(end) == c and end not in ids[:c]  # random weights never end a thought by themselves
        assert (clear["thinking_budget_tokens"], clear["answer_tokens"], clear["allocated_tokens"]) == (
            c, ANSWER_TOKENS, c + ANSWER_TOKENS)
        assert r.usage.completion_tokens == c + ANSWER_TOKENS == len(ids)
        assert r.usage.completion_tokens_details.reasoning_tokens == c
        assert choice.message.model_extra.get("reasoning") and choice.message.content
        d = moved(before, books(base))
        assert d["allocated_tokens_total"] == c + ANSWER_TOKENS and d["generated_tokens_total"] == len(ids)

    # Without the client's own budget, CLEAR's cap less the answer allowance is the thought (streamed here).
    chunks = list(client(base).chat.completions.create(
        model=REASONING_MODEL, messages=QUESTION, max_tokens=60, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[0].model_extra["clear"]["thinking_budget_tokens"] == 60 - ANSWER_TOKENS
    assert chunks[-1].usage.completion_tokens == 60
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 60 - ANSWER_TOKENS


def test_a_thinking_budget_on_an_engine_without_reasoning_is_refused_before_the_budget(urls):
    before = books(urls[TOOLS_APP])
    r = httpx.post(f"{urls[TOOLS_APP]}/v1/chat/completions", timeout=60, json={
        "model": TOOLS_MODEL, "messages": QUESTION, "thinking_token_budget": 10})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"
    assert moved(before, books(urls[TOOLS_APP]))["allocated_tokens_total"] == 0


def test_vllms_benchmark_client_runs_unchanged(urls, vllm_fleet):
    """``vllm bench serve`` (what ../shared/tools/vllm-bench/vllm_bench.py runs), called in this process."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args([
        "--backend", "openai-chat", "--base-url", urls[TOOLS_APP], "--endpoint", "/v1/chat/completions",
        "--model", TOOLS_MODEL, "--tokenizer", str(vllm_fleet.tools_model_dir), "--dataset-name", "random",
        "--random-input-len", "32", "--random-output-len", "24", "--num-prompts", "12", "--max-concurrency", "4",
        "--ignore-eos", "--disable-tqdm"]))
    assert (result["completed"], result["failed"]) == (12, 0)
    assert result["total_output_tokens"] == 12 * 24
