"""The service learns its length model from the traffic it serves (deployments.learner), live.

The replay engine serves the code pool, which the shipped head was not fitted on (it predicts code answers
about 2.5 times too long). The learner refits from what the requests generated and publishes versions that
the predictor and the allocator take up; killed, it comes back with the model and the observations it had.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from clear_core.traces import load_pool
from tests.conftest import CODE_POOL
from tests.factories import app_args

pytestmark = pytest.mark.cluster

APP = "learns"


def args(log_url: str) -> dict:
    return app_args(
        allocator={"policy": "clear-cost-emp",
                   "budget": {"tokens_per_query": 256, "window_queries": 500, "refund_unused": True}},
        predictor={"backend": "minilm-ridge"},
        engine={"trace_path": str(CODE_POOL), "advanced": {"decode_tokens_per_s": 200000.0}},
        learner={"advanced": {"refit_every": 40, "min_observations": 40, "refit_interval_s": 3.0, "poll_s": 0.5,
                              "log_url": log_url, "log_flush_s": 1.0, "holdout_share": 0.25}},
    )


def chat(url: str, prompt: str) -> dict:
    body = {"model": "clear-replay", "messages": [{"role": "user", "content": prompt}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    return {"status": r.status_code, **r.json()}


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/clear/status", timeout=30).json()


def wait_for(what, predicate, timeout_s=90.0):
    deadline = time.time() + timeout_s
    while True:
        got = what()
        if predicate(got):
            return got
        assert time.time() < deadline, f"timed out; last: {json.dumps(got)[:2000]}"
        time.sleep(0.5)


def test_the_service_publishes_learned_models_and_keeps_them_across_a_learner_restart(cluster, tmp_path):
    import ray

    prompts = [p.problem for p in load_pool(CODE_POOL)][:160]
    url = cluster.deploy(args(str(tmp_path / "learner")), APP)
    try:
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(lambda p: chat(url, p), prompts[:150]))
        assert {r["status"] for r in first} <= {200, 429}
        served = [r for r in first if r["status"] == 200]
        assert served and all(r["clear"]["prediction_source"] == "minilm-ridge" for r in served)
        assert {r["clear"]["length_model_version"] for r in served[:8]} == {0}  # the shipped head first

        learned = wait_for(lambda: status(url), lambda s: s["learner"]["model_version"] >= 1
                           and s["length_model_version"] == s["learner"]["model_version"]
                           and s["learner"]["records"] == len(served))
        lrn = learned["learner"]
        assert lrn["records"] == len(served) and lrn["observations"] == len(served)
        outcome, ll = lrn["last_refit"]["outcome"], lrn["last_refit"]["heldout_log_likelihood"]
        in_service = {"published": "candidate", "kept": "current"}[outcome]  # never rolled back on this traffic
        assert ll[in_service] > ll["prior"]  # the learned model describes held-out traffic better than the head
        assert 0.0 < lrn["censored_share"] < 1.0
        # the predictor replica took the model up: new requests are priced with it
        version = lrn["model_version"]
        later = wait_for(lambda: chat(url, prompts[150]), lambda r: r["status"] != 200
                         or r["clear"]["length_model_version"] == version)
        assert later["status"] in (200, 429)
        books = status(url)
        assert books["reserved_tokens"] == 0 or books["in_flight_reservations"] > 0
        assert books["allocated_tokens_total"] == (books["generated_tokens_total"] + books["refunded_tokens_total"]
                                                   + books["reserved_tokens"])

        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Learner" in a["name"]]
        assert len(victims) == 1
        logged = lambda: sum(len(p.read_text().splitlines())  # noqa: E731
                             for p in (tmp_path / "learner" / "traffic").glob("*.jsonl"))
        time.sleep(3.0)  # the later requests' records reach the learner (sent within 2 s)
        observed = status(url)["learner"]["observations"]
        assert observed > len(served)
        wait_for(logged, lambda n: n == observed)  # the log is written within log_flush_s (+ a 1 s check)
        version = status(url)["learner"]["model_version"]  # the later requests may have brought one more refit
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        back = wait_for(lambda: status(url), lambda s: "error" not in s.get("learner", {"error": 1})
                        and s["learner"]["window"] > 0, timeout_s=120)
        assert back["learner"]["model_version"] == version  # the published model, read back
        assert back["learner"]["window"] == observed  # every observation, re-read from the log
    finally:
        cluster.delete(APP, wait=False)
