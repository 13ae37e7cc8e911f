"""Budget invariant under load: 300 concurrent requests, random caps, early stops,
client disconnects, injected engine errors and an engine replica killed mid-run.

Asserted from the ledger (``/v1/clear/status``, polled during the run and read
after it) and from the exported metrics.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.factories import app_args

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(400)]

APP = "load"
N_REQUESTS = 300
ARGS = app_args(
    allocator={
        "budget": {"mode": "rate", "tokens_per_s": 40_000.0, "burst_tokens": 150_000.0},
        "advanced": {"pricing_window_requests": 128, "reservation_ttl_s": 120.0},
    },
    engine={
        "advanced": {"decode_tokens_per_s": 4000.0, "stream_chunk_tokens": 16, "max_concurrent_requests": 64,
                     "fail_probability": 0.05},
        "deployment": {"min_replicas": 2, "max_ongoing_requests": 200},
    },
    ingress={"deployment": {"min_replicas": 1, "max_ongoing_requests": 1000}},
)


def kill_one_engine_replica(app: str) -> str:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{app}#ReplayEngine" in a["name"]]
    assert names, "no engine replica found"
    victim = names[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random, i: int) -> str:
    prompt = f"Load test problem {i}: " + "compute this. " * rng.randint(1, 40)
    body = {"model": "clear-replay", "messages": [{"role": "user", "content": prompt}]}
    if rng.random() < 0.7:
        body["max_tokens"] = rng.randint(1, 3000)  # random client caps: early stops below CLEAR's cap
    mode = rng.choice(["whole", "stream", "disconnect"])
    if mode == "whole":
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        return f"whole:{r.status_code}"
    body["stream"] = True
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return f"{mode}:{r.status_code}"
        n = 0
        keep = rng.randint(1, 4)
        async for line in r.aiter_lines():
            if mode == "disconnect" and line.startswith("data:"):
                n += 1
                if n >= keep:
                    return "disconnect:200"  # leaving the block closes the connection mid-stream
            if '"engine_error"' in line:
                return f"{mode}:engine_error"
        return f"{mode}:200"


async def drive(url: str, snapshots: list) -> dict:
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=N_REQUESTS + 10, max_keepalive_connections=N_REQUESTS + 10)
    stop = asyncio.Event()

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def poll():
            while not stop.is_set():
                snapshots.append((await client.get(f"{url}/v1/clear/status")).json())
                await asyncio.sleep(0.1)

        async def killer():
            await asyncio.sleep(2.5)
            return await asyncio.to_thread(kill_one_engine_replica, APP)

        poller = asyncio.create_task(poll())
        kill = asyncio.create_task(killer())
        results = await asyncio.gather(*(one_request(client, url, rng, i) for i in range(N_REQUESTS)), return_exceptions=True)
        stop.set()
        await poller
        killed = await kill
    counts: dict = {}
    for r in results:
        key = r if isinstance(r, str) else f"exception:{type(r).__name__}"
        counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "killed": killed}


def test_budget_invariant_under_load(cluster):
    url = cluster.deploy(ARGS, APP)
    try:
        snapshots: list = []
        t0 = time.time()
        out = asyncio.run(drive(url, snapshots))
        elapsed = time.time() - t0
        counts = out["counts"]
        print(f"\nload: {N_REQUESTS} requests in {elapsed:.1f}s, outcomes {counts}, killed {out['killed']}")
        assert not any(k.startswith("exception") for k in counts), counts
        assert sum(counts.values()) == N_REQUESTS
        assert any(k.endswith(":200") for k in counts)
        assert any("429" in k for k in counts), "the budget should abandon some requests"
        assert any("engine_error" in k or "502" in k for k in counts), "injected or killed-replica errors expected"
        # During the run: never reserved + spent > granted.
        assert len(snapshots) >= 3  # polled through the same (busy) ingress
        for s in snapshots:
            assert s["invariant_holds"] and s["reserved_tokens"] + s["spent_tokens"] <= s["granted_tokens"] + 1e-6
        assert max(s["in_flight_reservations"] for s in snapshots) > 10  # it really was concurrent
        # After the run: every reservation released, the books balance.
        deadline = time.time() + 30
        while True:
            st = httpx.get(f"{url}/v1/clear/status", timeout=10).json()
            if st["in_flight_reservations"] == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        print(f"ledger after: {st}")
        assert st["in_flight_reservations"] == 0 and st["reserved_tokens"] == 0
        assert st["expired_reservations_total"] == 0
        assert st["allocated_tokens_total"] == st["generated_tokens_total"] + st["refunded_tokens_total"]
        assert st["spent_tokens"] == st["generated_tokens_total"]  # rate mode refunds the unused part
        assert st["refunded_tokens_total"] > 0
        assert st["arrivals"] == N_REQUESTS - counts.get("whole:400", 0)
        # The same from the metrics endpoint.
        from deployments import metrics as m

        alloc = cluster.wait_metric(f"ray_{m.TOKENS_ALLOCATED}_total", APP, lambda v: v == st["allocated_tokens_total"])
        gen = cluster.wait_metric(f"ray_{m.TOKENS_GENERATED}_total", APP, lambda v: v == st["generated_tokens_total"])
        ref = cluster.wait_metric(f"ray_{m.TOKENS_REFUNDED}_total", APP, lambda v: v == st["refunded_tokens_total"])
        reserved = cluster.wait_metric(f"ray_{m.BUDGET_RESERVED}", APP, lambda v: v == 0)
        inflight = cluster.wait_metric(f"ray_{m.IN_FLIGHT}", APP, lambda v: v == 0)
        requests = cluster.wait_metric(f"ray_{m.REQUESTS}_total", APP, lambda v: v == N_REQUESTS)
        print(f"metrics: allocated {alloc} generated {gen} refunded {ref} reserved {reserved} in_flight {inflight} requests {requests}")
        assert alloc == st["allocated_tokens_total"] and gen + ref == alloc
        assert reserved == 0 and inflight == 0
        assert requests == N_REQUESTS
        errors = cluster.metric_sum(f"ray_{m.REQUESTS}_total", APP, outcome="error", error_type="engine_error")
        abandoned = cluster.metric_sum(f"ray_{m.REQUESTS}_total", APP, outcome="abandoned")  # insolvent or pool empty
        assert errors and errors > 0 and abandoned and abandoned > 0
    finally:
        cluster.delete(APP, wait=False)
