"""The books survive the Ray head and rolling updates: GCS fault tolerance on a real Redis.

Its own Ray head, not the shared in-process cluster: ``ray start --head`` with the GCS writing through to a
``redis-server`` (Debian's package; ``.ci/run`` installs it) on a free port other than 6379, the app
deployed with ``serve deploy`` as an operator does, then

1. a rolling update (``serve deploy`` of a changed config: the ingress's, the allocator's own and the
   budget) while 48 clients stream: every reservation settles once, nobody is charged for tokens it did not
   receive, the invariant holds at every look, and the books continue under the new budget;
2. every process of the head killed with ``kill -9`` and the head started again on the same Redis: the books
   come back field by field, nothing reserved is lost or charged twice, and the service answers again.

The module's first test is the rolling update; the second continues its books.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.factories import app_args

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
APP = "clear"
BUDGET_NAME = "gcs-ft-test"
MODEL = "clear-replay"
#: The books compared across the head's loss, field by field (/v1/clear/status).
BOOKS = ("granted_tokens", "spent_tokens", "arrivals", "allocated_tokens_total", "generated_tokens_total",
         "refunded_tokens_total", "expired_tokens_total", "recovered_tokens_total")
STREAMS = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tokens_per_query: int, pricing_window: int, ingress_extra: dict | None = None) -> dict:
    return app_args(
        allocator={"budget": {"tokens_per_query": tokens_per_query, "window_queries": 1000, "refund_unused": True},
                   "budget_name": BUDGET_NAME, "state_store": "gcs", "decisions": "ingress",
                   "advanced": {"pricing_window_requests": pricing_window, "lease_ttl_s": 5.0}},
        # About 1.5 s per stream: long enough that the update lands while every client is mid-stream.
        engine={"advanced": {"decode_tokens_per_s": 200.0, "stream_chunk_tokens": 8,
                             "max_concurrent_requests": 128}},
        ingress={"deployment": {"min_replicas": 2, "max_ongoing_requests": 256}, **(ingress_extra or {})},
        learner={"enabled": False},
    )


class RedisServer:
    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        assert exe, "redis-server is missing: `apt-get install redis-server` (.ci/run does)"
        self.port = _free_port()
        assert self.port != 6379
        self.password = secrets.token_hex(16)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not self.ping():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()  # never left behind
                raise AssertionError("redis-server did not start")
            time.sleep(0.1)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                got = b""
                while b"+PONG" not in got and b"-" not in got:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
                return b"+PONG" in got
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class RayHead:
    """``ray start --head`` with its GCS on Redis; :meth:`kill9` kills every process of it."""

    def __init__(self, redis: RedisServer):
        self.redis = redis
        self.temp_dir = tempfile.mkdtemp(prefix="cgft-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port, self.http_port = _free_port(), _free_port(), _free_port()
        self.env = {**os.environ, "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis.port}",
                    "RAY_external_storage_namespace": "clear-gcs-ft-test", "RAY_USAGE_STATS_ENABLED": "0",
                    # Ray's token authentication, with a token of this test's own (the CLI and the dashboard's
                    # REST API take it too).
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # The restarted GCS declares the killed head's node dead after 3 missed 1 s health checks
                    # (Ray's default waits longer), and only then restarts the actors that lived on it.
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "1000"}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        r = subprocess.run(
            ["ray", "start", "--head", f"--port={self.gcs_port}", f"--redis-password={self.redis.password}",
             "--num-cpus=4", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"ray start failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: those that name its temp dir, and all their descendants."""
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in arg for arg in (p.info["cmdline"] or [])):
                roots.append(p)
        out = {p.pid: p for p in roots}
        for p in roots:
            try:
                out.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return list(out.values())

    def kill9(self) -> int:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return len(procs)

    def serve_deploy(self, args: dict, path: Path) -> None:
        config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": self.http_port},
                  "applications": [{"name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
                                    "args": args}]}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        r = subprocess.run(["serve", "deploy", str(path), "-a", self.dashboard], env=self.env, capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, f"serve deploy failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"

    def app(self) -> dict:
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10,
                      headers={"Authorization": f"Bearer {self.token}"})
        return r.json().get("applications", {}).get(APP, {})

    def wait_running(self, timeout_s: float = 240.0, config_check=None) -> None:
        deadline = time.time() + timeout_s
        state = None
        while time.time() < deadline:
            try:
                app = self.app()
                state = app.get("status")
                if state == "RUNNING" and (config_check is None or config_check(app)):
                    return
                assert state != "DEPLOY_FAILED", app.get("message")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"the app is {state}, not RUNNING, after {timeout_s:.0f} s")

    def stop(self) -> None:
        self.kill9()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def status(url: str) -> dict:
    r = httpx.get(f"{url}/v1/clear/status", timeout=30)
    r.raise_for_status()
    return r.json()


def settled(url: str, timeout_s: float = 60.0) -> dict:
    """The books once nothing is in flight and two looks a report apart agree."""
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        st = status(url)
        if st["reserved_tokens"] == 0 and st["lease_reserved_tokens"] == 0 and last is not None and all(
                st[k] == last[k] for k in BOOKS):
            return st
        last = st
        time.sleep(0.5)
    raise AssertionError(f"the books did not settle within {timeout_s:.0f} s: {last}")


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: bool) -> tuple[int, int, str | None]:
    """(HTTP status, completion tokens the client received, finish reason) of one chat request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}: " + "why " * (i % 13)}],
            "max_tokens": 300}
    if not stream:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            return r.status_code, 0, None
        return 200, r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]
    body.update(stream=True, stream_options={"include_usage": True})
    tokens, finish = 0, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
    return 200, tokens, finish


async def _streams(url: str, stop: asyncio.Event, start: int) -> list[tuple[int, int, str | None]]:
    results: list = []

    async def client_loop(c: int, client: httpx.AsyncClient):
        i = start + c
        while not stop.is_set():
            results.append(await _one(client, url, i, stream=True))
            i += STREAMS

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=STREAMS + 8)) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(STREAMS)))
    return results


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    work = tmp_path_factory.mktemp("gcs-ft")
    redis = RedisServer(work)
    ray_head = RayHead(redis)
    try:
        ray_head.start()
        ray_head.serve_deploy(_args(300, 200), work / "serve-a.yaml")
        ray_head.wait_running()
        yield ray_head, work
    finally:
        ray_head.stop()
        redis.stop()


def test_a_rolling_update_of_the_allocator_and_the_budget_under_48_streams_keeps_the_books(head):
    ray_head, work = head
    url = ray_head.url
    first = asyncio.run(_warm(url))
    assert {code for code, _, _ in first} == {200}
    before = settled(url)
    print(f"\nbefore the update: {json.dumps({k: before[k] for k in BOOKS})}")

    looks: list[dict] = []

    async def watch(stop: asyncio.Event):
        """The books twice a second from the first stream to the last (a look the replacement fails is skipped)."""
        while not stop.is_set():
            try:
                looks.append(await asyncio.to_thread(status, url))
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)

    async def update_under_load():
        stop = asyncio.Event()
        clients = asyncio.create_task(_streams(url, stop, 1000))
        watcher = asyncio.create_task(watch(stop))
        await asyncio.sleep(2.0)  # every client is mid-stream
        changed = _args(450, 300, {"advanced": {"settle_ack_wait_s": 1.5}})
        await asyncio.to_thread(ray_head.serve_deploy, changed, work / "serve-b.yaml")
        await asyncio.to_thread(ray_head.wait_running, 240.0,
                                lambda app: app["deployed_app_config"]["args"]["allocator"]["budget"][
                                    "tokens_per_query"] == 450)
        await asyncio.sleep(6.0)  # the new replicas serve the streams for a while
        stop.set()
        await watcher
        return await clients

    results = asyncio.run(update_under_load())
    after = settled(url)
    codes = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    received = sum(tokens for code, tokens, _ in results if code == 200)
    unfinished = sum(1 for code, _, finish in results if code == 200 and finish is None)
    print(f"rolling update under {STREAMS} streams: {len(results)} requests, statuses {codes}, "
          f"{unfinished} streams cut, {received} tokens received")
    print(f"after the update: {json.dumps({k: after[k] for k in BOOKS})}; the invariant held at {len(looks)} looks "
          f"during it, {sum(not x['restored_after_restart'] for x in looks)} of them on the old allocator")
    assert len(results) >= 2 * STREAMS and codes.get(200, 0) >= 0.95 * len(results), codes
    # Every reservation settled once; the invariant held at every look, during the update and after.
    assert any(not st["restored_after_restart"] for st in looks) and any(st["restored_after_restart"] for st in looks)
    for st in looks + [after]:
        assert st["invariant_holds"] and st["books_reconcile"], st
    assert after["reserved_tokens"] == 0 and after["lease_reserved_tokens"] == 0
    assert after["allocated_tokens_total"] - before["allocated_tokens_total"] == (
        after["generated_tokens_total"] - before["generated_tokens_total"]
        + after["refunded_tokens_total"] - before["refunded_tokens_total"]
        + after["expired_tokens_total"] - before["expired_tokens_total"])  # (recovered caps count as refunded)
    # Nobody is charged for tokens it did not receive: what the books say was generated is what clients read.
    charged = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert charged <= received, (charged, received)
    # And what clients received free is exactly what the books recovered: a replica that stopped before its last
    # report reached the allocator (its last report is retried for LAST_REPORT_FOR_S; 0 in an undisturbed run).
    assert received - charged <= after["recovered_tokens_total"] - before["recovered_tokens_total"], (
        received, charged, after["recovered_tokens_total"])
    # The books continue under the new budget: spent stays spent, the block in progress keeps its credit.
    assert after["restored_after_restart"] is True and after["budget_changed_at_restart"] is True
    assert after["budget"]["tokens_per_query"] == 450
    assert after["spent_tokens"] >= before["spent_tokens"] and after["arrivals"] > before["arrivals"]
    assert after["granted_tokens"] == before["granted_tokens"] == 1000 * 300


async def _warm(url: str) -> list:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(_one(client, url, i, stream=False) for i in range(24)))


def test_the_books_survive_killing_the_head_and_starting_it_again_on_the_same_redis(head):
    ray_head, work = head
    url = ray_head.url
    before = settled(url)
    killed = ray_head.kill9()
    assert killed >= 5 and not ray_head.processes()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v1/clear/status", timeout=5)
    t0 = time.time()
    ray_head.start()  # the same Redis: the GCS finds the cluster, Serve its app, the allocator its books
    t1 = time.time()
    ray_head.wait_running(300.0)
    print(f"\nthe head started again in {t1 - t0:.1f} s; the app ran again {time.time() - t1:.1f} s later")
    after = status(url)
    print("\nbooks before and after the head's loss:")
    for key in BOOKS:
        print(f"  {key}: {before[key]} -> {after[key]}")
    assert after["restored_after_restart"] is True and after["budget_name"] == BUDGET_NAME
    for key in BOOKS:
        assert after[key] == before[key], key
    # The dead ingress replicas' leases lapse (lease_ttl_s 5) and return to the pool: nothing stays held, nothing
    # is charged. The two live replicas hold leases of their own.
    deadline = time.time() + 60
    while time.time() < deadline:
        st = status(url)
        if st["reclaimed_lease_tokens_total"] > before["reclaimed_lease_tokens_total"] and st["leases"] == 2:
            break
        time.sleep(0.5)
    assert st["reclaimed_lease_tokens_total"] > before["reclaimed_lease_tokens_total"] and st["leases"] == 2, st
    assert st["reserved_tokens"] == 0 and st["spent_tokens"] == before["spent_tokens"], st
    more = asyncio.run(_warm(url))
    assert {code for code, _, _ in more} == {200}
    final = settled(url)
    assert final["arrivals"] == before["arrivals"] + 24 and final["invariant_holds"] and final["books_reconcile"]
