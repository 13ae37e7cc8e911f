"""The embedded default end to end: the openai client, SSE, 4xx, 401, 429 and metrics."""

from __future__ import annotations

import importlib

import httpx
import openai
import pytest
import yaml

from tests.cluster.conftest import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

APP = "e2e"
TINY = "tiny"
AUTH = "auth"
SLOW = "slowpred"


def embedded_args() -> dict:
    """The args of serve_config.yaml, validated the way `serve run` does."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr).__name__ == "build_app"
    args = dict(app.args)
    # The test apps each get fresh books (the default's named budget would be shared by all of them).
    args["allocator"] = {k: v for k, v in args["allocator"].items() if k not in ("budget_name", "state_store")}
    return args


@pytest.fixture(scope="module")
def urls(cluster):
    args = embedded_args()
    assert args["engine"]["trace_path"] is None  # the embedded default needs nothing outside the repo
    # The four apps start side by side (one deploy call), and are deleted so at the end of the module.
    urls = cluster.deploy_many({
        APP: args,
        TINY: {**args, "allocator": {"policy": "clear",
                                     "budget": {"mode": "rate", "tokens_per_s": 10.0, "burst_tokens": 20.0}},
               "predictor": {"backend": "heuristic"}},  # (the learned predictor is APP's subject)
        AUTH: {**args, "ingress": {"api_keys": ["sk-good"]}, "predictor": {"backend": "heuristic"}},
        # A predictor that always times out: every request must still get a cap.
        SLOW: {**args, "predictor": {"backend": "heuristic", "placement": "deployment", "advanced": {"timeout_s": 1e-6}}},
    })
    yield {"base": urls[APP], "tiny": urls[TINY], "auth": urls[AUTH], "slow": urls[SLOW]}
    cluster.delete(APP, TINY, AUTH, SLOW, wait=False)


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def status(base: str) -> dict:
    return httpx.get(f"{base}/v1/clear/status", timeout=10).json()


def test_openai_client_chat_completion(urls):
    c = client(urls["base"])
    assert [m.id for m in c.models.list().data] == ["clear-replay"]
    r = c.chat.completions.create(
        model="clear-replay", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=64
    )
    clear = r.model_extra["clear"]
    assert set(clear) >= {"allocated_tokens", "predicted_threshold_tokens", "shadow_price", "policy"}
    assert clear["policy"] == "clear-cost-emp"  # policy auto on the embedded default's refunding budget
    assert 0 < clear["allocated_tokens"] <= 64  # min(client max_tokens, CLEAR cap)
    assert r.usage.completion_tokens == min(clear["allocated_tokens"], clear["replay"]["tokens"])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert clear["replay"]["synthetic"] is True and clear["replay"]["problem_id"].startswith("synthetic/")


def test_openai_client_streams_sse(urls):
    c = client(urls["base"])
    stream = c.chat.completions.create(
        model="clear-replay",
        messages=[{"role": "user", "content": "Count to ten."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert finishes and finishes[-1] in ("stop", "length")
    assert usage.completion_tokens > 0 and len(text) > 0
    assert chunks[0].model_extra["clear"]["allocated_tokens"] >= usage.completion_tokens


def test_legacy_completions_and_stream(urls):
    c = client(urls["base"])
    r = c.completions.create(model="clear-replay", prompt="Say hi", max_tokens=10)
    assert r.usage.completion_tokens <= 10 and r.choices[0].text
    parts = list(c.completions.create(model="clear-replay", prompt="Say hi", max_tokens=10, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text  # same replay, same cut


@pytest.mark.parametrize(
    "body, status_code, error_type",
    [
        ("{not json", 400, "invalid_request_error"),
        ('{"model": "clear-replay"}', 400, "invalid_request_error"),
        ('{"model": "clear-replay", "messages": []}', 400, "invalid_request_error"),
        ('{"model": "clear-replay", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400, "invalid_request_error"),
        ('{"model": "clear-replay", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000000}', 400, "invalid_request_error"),
        ('{"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        ('{"model": "clear-replay", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32768}', 400, "context_length_exceeded"),
    ],
)
def test_bad_input_is_a_4xx_and_leaves_the_budget_untouched(urls, body, status_code, error_type):
    before = status(urls["base"])
    r = httpx.post(f"{urls['base']}/v1/chat/completions", content=body, timeout=30)
    assert r.status_code == status_code, r.text
    assert r.json()["error"]["type"] == error_type
    after = status(urls["base"])
    assert after["arrivals"] == before["arrivals"]
    assert after["allocated_tokens_total"] == before["allocated_tokens_total"]


def test_prompt_over_the_context_limit(urls):
    long_prompt = "word " * 40_000  # > 32,768 tokens with any tokenizer
    r = httpx.post(
        f"{urls['base']}/v1/completions", json={"model": "clear-replay", "prompt": long_prompt}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"


def test_tiny_budget_answers_429_with_retry_after(urls):
    c = client(urls["tiny"])
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="clear-replay", messages=[{"role": "user", "content": "Prove Fermat."}])
    resp = info.value.response
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["type"] == "budget_abandoned"
    assert "shadow_price" in err
    st = status(urls["tiny"])
    assert st["reserved_tokens"] == 0 and st["abandonment_rate"] > 0
    assert st["budget_mode"] == "rate"


def test_api_keys(urls):
    with pytest.raises(openai.AuthenticationError):
        client(urls["auth"], "sk-bad").chat.completions.create(
            model="clear-replay", messages=[{"role": "user", "content": "hi"}]
        )
    r = httpx.get(f"{urls['auth']}/v1/clear/status", headers={"Authorization": "Bearer sk-good"}, timeout=10)
    assert r.status_code == 200 and r.json()["arrivals"] == 0  # the refused request never reached the budget
    ok = client(urls["auth"], "sk-good").chat.completions.create(
        model="clear-replay", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert ok.usage.completion_tokens <= 5


def test_metrics_are_exported_with_their_names(urls, cluster):
    from deployments import metrics as m

    client(urls["base"]).chat.completions.create(
        model="clear-replay", messages=[{"role": "user", "content": "metrics please"}], max_tokens=8
    )
    admitted = cluster.wait_metric(f"ray_{m.REQUESTS}_total", APP, lambda v: v >= 1, outcome="admitted")
    assert admitted and admitted >= 1
    text = cluster.scrape()
    for name, exported in m.EXPORTED_NAMES.items():
        if name in (m.RESERVATIONS_EXPIRED, m.TOKENS_EXPIRED, m.TOKENS_RECOVERED, m.PREDICTOR_FALLBACKS, m.TOKENS_REFUNDED,
                    m.LEARNER_RECORDS, m.LEARNER_REFITS, m.EXPLORED_REQUESTS, m.EXPLORED_TOKENS):
            continue  # counters appear only once incremented
        if name in (m.LEARNER_CAP_COVERAGE, m.LEARNER_HELDOUT_ERROR, m.LEARNER_HELDOUT_LL):
            continue  # set once the learner has observations (a refit) to measure them on
        assert any(f"\n{e}{{" in text for e in exported), (name, exported)
    # The 4xx tests above: the ingress's counter reaches the endpoint within a report interval or two.
    rejected = cluster.wait_metric(f"ray_{m.REQUESTS}_total", APP, lambda v: v >= 1, outcome="rejected")
    assert rejected is not None and rejected >= 1


def test_predictor_timeout_falls_back_and_is_counted(urls, cluster):
    from deployments import metrics as m

    c = client(urls["slow"])
    for i in range(3):
        r = c.chat.completions.create(model="clear-replay", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=16)
        clear = r.model_extra["clear"]
        assert clear["prediction_source"] == "heuristic" and clear["allocated_tokens"] >= 1
    n = cluster.wait_metric(f"ray_{m.PREDICTOR_FALLBACKS}_total", SLOW, lambda v: v >= 3, reason="timeout")
    assert n is not None and n >= 3
