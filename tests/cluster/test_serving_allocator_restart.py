"""Kill the allocator replica mid-stream: Serve restarts it and the books survive (GCS KV)."""

import time

import httpx
import pytest

from tests.factories import app_args

pytestmark = pytest.mark.cluster

APP = "restart"
ARGS = app_args(
    allocator={"budget": {"tokens_per_query": 300, "window_queries": 1000}},
    engine={"advanced": {"decode_tokens_per_s": 100000.0}, "deployment": {"min_replicas": 1}},
)


def status(url):
    return httpx.get(f"{url}/v1/clear/status", timeout=30).json()


def send(url, n, start):
    codes = []
    for i in range(start, start + n):
        body = {"model": "clear-replay", "messages": [{"role": "user", "content": f"restart test {i} " * (1 + i % 9)}]}
        codes.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)
    return codes


@pytest.mark.parametrize("decisions", ["central", "ingress"])
def test_allocator_restart_keeps_the_budget(cluster, decisions):
    import ray

    args = app_args(**{**ARGS, "allocator": {**ARGS["allocator"], "decisions": decisions}})
    url = cluster.deploy(args, APP)
    try:
        codes = send(url, 30, 0)
        assert set(codes) <= {200, 429} and 200 in codes
        if decisions == "ingress":  # the settles reach the books with the next report ...
            time.sleep(0.5)
        before = status(url)
        deadline = time.time() + 30
        while status(url)["snapshots_written_version"] < before["books_version"]:  # ... and then a snapshot
            assert time.time() < deadline, "the books were not written within 30 s"
            time.sleep(0.2)
        assert before["arrivals"] == 30 and before["spent_tokens"] > 0
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Allocator" in a["name"]]
        assert len(victims) == 1
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        deadline = time.time() + 60
        after = None
        while time.time() < deadline:  # Serve notices the dead replica and starts a new one
            try:
                after = status(url)
                if after.get("restored_after_restart"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        assert after is not None and after["restored_after_restart"] is True, after
        for key in ("granted_tokens", "spent_tokens", "arrivals", "allocated_tokens_total"):
            assert after[key] == before[key], key
        codes = send(url, 20, 30)
        if decisions == "ingress":
            time.sleep(1.0)
        final = status(url)
        assert final["arrivals"] == 50  # the block keeps counting: no second grant of budget
        assert final["granted_tokens"] == before["granted_tokens"] == 1000 * 300
        assert final["reserved_tokens"] == 0 and final["lease_reserved_tokens"] == 0 and final["invariant_holds"]
        assert final["spent_tokens"] + final["leased_tokens"] <= final["granted_tokens"]
    finally:
        cluster.delete(APP, wait=False)


def test_a_named_budget_keeps_its_books_across_redeploys(cluster, tmp_path):
    """Same budget_name: a deleted and redeployed app (as a new `serve run` would) continues the books;
    a new name starts fresh ones. The file store outlives the Ray cluster as well."""
    args = app_args(
        allocator={"budget": {"tokens_per_query": 300, "window_queries": 1000}, "budget_name": "redeploy-test",
                   "state_store": "file", "advanced": {"state_dir": str(tmp_path)}},
        engine={"advanced": {"decode_tokens_per_s": 100000.0}},
    )
    url = cluster.deploy(args, "named")
    try:
        send(url, 12, 0)
        before = status(url)
        assert before["arrivals"] == 12 and before["budget_name"] == "redeploy-test"
    finally:
        cluster.delete("named")
    assert (tmp_path / "budget_redeploy-test.json").is_file()
    url = cluster.deploy(args, "named")
    try:
        again = status(url)
        assert again["restored_after_restart"] is True
        for key in ("arrivals", "granted_tokens", "spent_tokens", "allocated_tokens_total", "generated_tokens_total"):
            assert again[key] == before[key], key
        send(url, 3, 100)
        assert status(url)["arrivals"] == 15
    finally:
        cluster.delete("named")
    fresh_args = app_args(**{**args, "allocator": {**args["allocator"], "budget_name": "another-budget"}})
    url = cluster.deploy(fresh_args, "named")
    try:
        fresh = status(url)
        assert fresh["arrivals"] == 0 and fresh["restored_after_restart"] is False
    finally:
        cluster.delete("named")
