"""A named budget's books survive deleting and redeploying the app (the file store).

(An allocator replica killed mid-load, restarted by Serve from its snapshot: tests/cluster/test_repeated_faults.py;
the Ray head killed: tests/cluster/test_gcs_fault_tolerance.py; the restore itself, field by field:
tests/unit/serving/test_allocator_durability.py.)"""

import httpx
import pytest

from tests.factories import app_args

pytestmark = pytest.mark.cluster

def status(url):
    return httpx.get(f"{url}/v1/clear/status", timeout=30).json()


def send(url, n, start):
    codes = []
    for i in range(start, start + n):
        body = {"model": "clear-replay", "messages": [{"role": "user", "content": f"restart test {i} " * (1 + i % 9)}]}
        codes.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)
    return codes


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
