"""What a vLLM client may send: the replay engine honours or refuses each field by name, requests for the vLLM
engine are validated by vLLM's own models, and the utility endpoints vLLM clients call answer (no Ray)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.config import AppConfig, ReplayEngineConfig
from deployments.engines.base import EngineRequest
from deployments.engines.replay import ReplayEngine
from deployments.errors import BadRequestError
from deployments.ingress import Ingress
from deployments.openai_schema import parse_chat
from deployments.vllm_protocol import parse_vllm
from tests.cluster.conftest import SHARED
from tests.factories import app_args
from tests.fakes import FakeAllocator, FakeEngine, FakePredictor, chat, make_ingress, make_request, request, settle_tasks

QWEN = SHARED / "data" / "tokenizer" / "qwen.tiktoken"
TOOL = {"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "blue"]}}, "required": ["colour"]}}}


# -- the replay engine: honest about what it can emulate ------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("tools", [TOOL]), ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
    ("logprobs", True), ("top_logprobs", 2), ("n", 3), ("structured_outputs", {"json": {"type": "object"}}),
    ("thinking_token_budget", 64), ("use_beam_search", True), ("echo", True),
])
def test_the_replay_engine_refuses_what_it_cannot_emulate_naming_the_field(field, value):
    with pytest.raises(BadRequestError) as err:
        parse_chat(chat(**{field: value}), 4096)
    assert err.value.param == field and field in str(err.value)


def test_vllm_sampling_extensions_pass_and_reach_the_engine():
    extensions = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "chat_template_kwargs": {"x": 1},
                  "skip_special_tokens": False, "ignore_eos": True, "min_tokens": 4}
    req = parse_chat(chat(**extensions, logprobs=False, tools=[]), 4096)  # defaults of refused fields pass too
    assert {k: req.sampling[k] for k in extensions} == extensions


def test_an_unknown_field_is_still_refused():
    with pytest.raises(BadRequestError, match="Unrecognized request argument supplied: max_token") as err:
        parse_chat(chat(max_token=5), 4096)
    assert err.value.param == "max_token"


def _replay(**sampling) -> tuple[int, str]:
    engine = ReplayEngine(ReplayEngineConfig(advanced={"decode_tokens_per_s": 1e9, "time_to_first_token_s": 0.0}))
    problem = engine.workload.problems[0]
    recorded = problem.samples[0].tokens
    req = EngineRequest(request_id="r", kind="chat", prompt=problem.problem, messages=None, model="clear-replay",
                        cap_tokens=recorded + 50, sample_index=0, sampling=sampling)

    async def run():
        return [c async for c in engine.generate(req)]

    chunks = asyncio.run(run())
    return sum(c.tokens for c in chunks), chunks[-1].finish_reason, recorded


def test_ignore_eos_generates_the_whole_cap_and_min_tokens_at_least_that_many():
    n, finish, recorded = _replay()
    assert (n, finish) == (recorded, "stop")  # the recorded length, under a cap 50 above it
    n, finish, recorded = _replay(ignore_eos=True)
    assert (n, finish) == (recorded + 50, "length")  # vLLM's ignore_eos: to the cap
    n, finish, recorded = _replay(min_tokens=recorded + 10)
    assert (n, finish) == (recorded + 10, "stop")  # no end before min_tokens, then the model stops
    n, finish, recorded = _replay(min_tokens=3)
    assert n == recorded  # a shorter floor changes nothing


def test_min_tokens_above_the_cap_clear_gives_is_refused_and_refunded_whole():
    async def run():
        alloc = FakeAllocator(cap=40)
        ing = make_ingress(alloc, FakeEngine(chunks=4))
        resp = await ing._complete(make_request(chat(min_tokens=100)), "chat")
        await settle_tasks(ing)
        return alloc, resp

    alloc, resp = asyncio.run(run())
    assert resp.status_code == 400 and json.loads(resp.body)["error"]["param"] == "min_tokens"
    assert alloc.settled == [(alloc.reserved[0], 0)] and alloc.failed == [True]  # charged nothing


def test_min_tokens_above_the_clients_own_cap_is_refused_before_any_budget():
    with pytest.raises(BadRequestError, match="min_tokens"):
        parse_chat(chat(min_tokens=100, max_tokens=50), 4096)


# -- the vLLM engine: vLLM's own request models ---------------------------------------------------------------


@pytest.mark.parametrize("kind, body", [
    ("chat", chat(tools=[TOOL], tool_choice="required")),
    ("chat", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})),
    ("chat", chat(logprobs=True, top_logprobs=2, n=3, top_k=5, min_p=0.1, min_tokens=3, seed=3, store=False)),
    ("chat", chat(stream=True, stream_options={"include_usage": True}, ignore_eos=True,
                  messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                  max_completion_tokens=64)),
    ("completion", {"model": "m", "prompt": "hi", "echo": True, "logprobs": 2, "max_tokens": 5}),
])
def test_every_field_vllm_accepts_passes_its_models(kind, body):
    req = parse_vllm(kind, body, 4096)
    assert req.request.model_extra == {}
    if kind == "chat" and body.get("stream"):
        assert (req.max_tokens, req.include_usage, req.prompt) == (64, True, "a\nb")  # parts joined as vLLM joins them


@pytest.mark.parametrize("kind, body, param", [
    ("chat", chat(max_token=5), "max_token"),  # vLLM would keep and ignore it
    ("chat", chat(best_of=3), "best_of"),  # not a field of vLLM 0.29: it would be ignored
    ("chat", chat(request_id="mine"), "request_id"),  # the operator's
    ("chat", chat(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools"),  # a tool without a name
    ("chat", chat(stream_options={"include_usage": True}), "stream_options"),  # not streaming
    ("completion", {"model": "m", "prompt": "hi", "max_completion_tokens": 5}, "max_completion_tokens"),
    ("chat", chat(messages="hi"), "messages"),
])
def test_what_vllm_would_refuse_or_silently_drop_is_a_400_naming_the_field(kind, body, param):
    with pytest.raises(BadRequestError) as err:
        parse_vllm(kind, body, 4096)
    assert err.value.param == param


@pytest.mark.parametrize("body, needle", [
    (chat(n=0), "n must be at least 1"), (chat(temperature=-1), "temperature"),
    (chat(min_tokens=50, max_tokens=10), "min_tokens"),
])
def test_the_checks_vllm_runs_at_the_engine_run_before_any_budget(body, needle):
    with pytest.raises(BadRequestError, match=needle):
        parse_vllm("chat", body, 4096)


# -- the utility endpoints -----------------------------------------------------------------------------------


def _ingress(tokenizer: bool) -> Ingress:
    engine = {"kind": "replay", "tokenizer_path": str(QWEN) if tokenizer else None}
    return Ingress(AppConfig.model_validate(app_args(engine=engine, predictor={"placement": "deployment"})), FakePredictor(), FakeAllocator(), FakeEngine(),
                   metrics=False)


def test_tokenize_and_detokenize_round_trip_on_the_models_vocabulary():
    ing = _ingress(tokenizer=True)
    text = "The shadow price of a token clears the market."
    tok = asyncio.run(ing.tokenize(request(json.dumps({"model": "clear-replay", "prompt": text}).encode(),
                                           path="/tokenize")))
    assert tok["count"] == len(tok["tokens"]) == ing.codec.count(text) and tok["max_model_len"] == 32768
    back = asyncio.run(ing.detokenize(request(json.dumps({"tokens": tok["tokens"]}).encode(), path="/detokenize")))
    assert back["prompt"] == text


def test_without_a_tokenizer_tokenize_says_why_it_cannot():
    from deployments.errors import NotImplementedByEngineError

    ing = _ingress(tokenizer=False)
    with pytest.raises(NotImplementedByEngineError, match="tokenizer_path"):
        asyncio.run(ing.tokenize(request(json.dumps({"prompt": "x"}).encode(), path="/tokenize")))


def test_the_model_card_carries_the_context_length():
    ing = _ingress(tokenizer=False)
    card = asyncio.run(ing.models(request(b"", path="/v1/models")))["data"][0]
    assert card["max_model_len"] == 32768 and card["root"] == "clear-replay" and card["id"] == "clear-replay"
