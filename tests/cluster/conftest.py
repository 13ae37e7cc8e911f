"""One local Ray (2 CPUs) and one Serve instance shared by every cluster test.

Apps are deployed under their own route prefix (``deploy(args, name)``) and
deleted by the test module that made them; Serve and Ray are shut down at the
end of the session. Every test collected under this folder is marked ``cluster``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
MAIN_POOL = SHARED / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
QWEN_TOKENIZER = SHARED / "data" / "tokenizer" / "qwen.tiktoken"


HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    # A conftest's hook sees every collected item, not only this folder's: mark just the ones under it.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.cluster)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: How long a deploy waits for an earlier app of the same name to be deleted.
DELETE_TIMEOUT_S = 120.0


class Cluster:
    def __init__(self, http_port: int, metrics_port: int):
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.base = f"http://127.0.0.1:{http_port}"
        self._deleting: set[str] = set()  # apps deleted with wait=False, perhaps still shutting down

    def deploy(self, args: dict, name: str) -> str:
        """Deploy build_app(args) as app ``name`` at ``/name``, wait until it runs; return its base URL."""
        return self.deploy_many({name: args})[name]

    def deploy_many(self, apps: dict[str, dict]) -> dict[str, str]:
        """Deploy each ``name: args`` as ``deploy`` does, in one call: Serve starts all their replicas side by
        side, and the call returns once every app runs. Returns each app's base URL."""
        from ray import serve

        from deployments.app import build_app

        self._wait_deleted(apps)
        serve.run_many([serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}")
                        for name, args in apps.items()])
        return {name: f"{self.base}/{name}" for name in apps}

    def delete(self, *names: str, wait: bool = True) -> None:
        """Delete the apps, side by side. With ``wait=False`` the caller goes on while their replicas shut
        down (a module's last use of its apps); a later deploy of one of those names waits for it."""
        from ray import serve

        for name in names:
            serve.delete(name, _blocking=False)
        self._deleting.update(names)
        if wait:
            self._wait_deleted(names)

    def _wait_deleted(self, names) -> None:
        from ray import serve

        pending = self._deleting & set(names)
        deadline = time.time() + DELETE_TIMEOUT_S
        while pending:
            pending &= set(serve.status().applications)
            if pending:
                assert time.time() < deadline, f"apps {sorted(pending)} not deleted within {DELETE_TIMEOUT_S:.0f} s"
                time.sleep(0.2)
        self._deleting -= set(names)

    def scrape(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    def metric_sum(self, name: str, app: str, **labels) -> float | None:
        """Sum of the samples of ``name`` for application ``app`` (None if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total, seen = 0.0, False
        for fam in text_string_to_metric_families(self.scrape()):
            for s in fam.samples:
                if s.name != name or s.labels.get("application") != app:
                    continue
                if any(s.labels.get(k) != v for k, v in labels.items()):
                    continue
                total += s.value
                seen = True
        return total if seen else None

    def wait_metric(self, name: str, app: str, predicate, timeout_s: float = 40.0, **labels):
        deadline = time.time() + timeout_s
        value = None
        while time.time() < deadline:
            value = self.metric_sum(name, app, **labels)
            if value is not None and predicate(value):
                return value
            time.sleep(1.0)
        return value


#: How often Ray's metrics reach the export port in the test cluster; a value read twice
#: more than this apart, unchanged, has received its last report.
METRICS_REPORT_INTERVAL_S = 2.0


@pytest.fixture(scope="session")
def cluster():
    import ray
    from ray import serve

    http_port, metrics_port = _free_port(), _free_port()
    # Metrics reach the export port every METRICS_REPORT_INTERVAL_S (Ray's default is 10 s).
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": int(METRICS_REPORT_INTERVAL_S * 1000)})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield Cluster(http_port, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def main_pool_path() -> str:
    if not MAIN_POOL.is_file():
        raise FileNotFoundError(f"the shared trace pool is missing: {MAIN_POOL}")
    return str(MAIN_POOL)
