"""One local Ray and one Serve instance shared by every cluster test.

Apps are deployed under their own route prefix (``deploy(args, name)``) and
deleted by the test module that made them; Serve and Ray are shut down at the
end of the session. Every test collected under this folder is marked ``cluster``.
"""

from __future__ import annotations

import copy
import socket
import time
from dataclasses import dataclass
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
    # 4 logical CPUs on the 2 cores CI has: the vLLM fleet's two engines hold a whole logical CPU each
    # (their placement groups), and the CLEAR graphs attached to them must still be scheduled beside them.
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": int(METRICS_REPORT_INTERVAL_S * 1000)})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield Cluster(http_port, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


#: The vLLM fleet every real-engine test shares: one bare Ray Serve LLM application (``build_openai_app``, the
#: anchor the CLEAR graph is compared with) serving two random-weight models; CLEAR graphs attach to it
#: (``engine.advanced.attach_to_app``), so the session starts each engine once.
FLEET_APP = "fleet"
TOOLS_MODEL = "clear-tiny"  # Qwen2.5 vocabulary; hermes tool calls, whitespace-free structured outputs
REASONING_MODEL = "clear-tiny-r1"  # the same with <think> tokens, a template that opens a thought, deepseek_r1
FLEET_TOOLS_CONTEXT = 16384
FLEET_REASONING_CONTEXT = 4096


@dataclass(frozen=True)
class Fleet:
    anchor: str  # the bare Ray Serve LLM app's base URL (its /v1 is the OpenAI API)
    tools_model_dir: Path
    reasoning_model_dir: Path


def warm_up(url: str, model: str, timeout_s: float = 400.0) -> None:
    """A fresh vLLM engine's first request compiles and allocates: retry until it answers."""
    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "warm up", "max_tokens": 2},
                           timeout=300)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"vLLM ({model}) did not answer within {timeout_s:.0f} s"
        time.sleep(2)


@pytest.fixture(scope="session")
def vllm_fleet(cluster, tmp_path_factory) -> Fleet:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from clear_llm.tiny_model import make_model
    from deployments.engines.vllm import CPU_LLM_CONFIG

    work = tmp_path_factory.mktemp("fleet")
    tools_dir = make_model(work / "tiny", tiktoken_path=str(QWEN_TOKENIZER))
    reasoning_dir = make_model(work / "tiny-r1", tiktoken_path=str(QWEN_TOKENIZER), reasoning=True)

    def llm_config(model_id, source, context, runtime_env=None, **engine_kwargs):
        base = copy.deepcopy(CPU_LLM_CONFIG)
        base["engine_kwargs"].update(max_model_len=context, **engine_kwargs)
        base["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        return LLMConfig(model_loading_config={"model_id": model_id, "model_source": str(source)},
                         runtime_env=runtime_env, **base)

    # Tool calls and JSON answers that a random-weight model finishes: JSON without free whitespace (xgrammar),
    # and tool_choice required/named through vLLM's JSON-schema path (not the strict structural tag, whose JSON
    # allows unlimited whitespace).
    tools = llm_config(TOOLS_MODEL, tools_dir, FLEET_TOOLS_CONTEXT,
                       runtime_env={"env_vars": {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}},
                       enable_auto_tool_choice=True, tool_call_parser="hermes",
                       structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    reasoning = llm_config(REASONING_MODEL, reasoning_dir, FLEET_REASONING_CONTEXT, reasoning_parser="deepseek_r1")
    serve.run(build_openai_app({"llm_configs": [tools, reasoning]}), name=FLEET_APP, route_prefix=f"/{FLEET_APP}")
    anchor = f"{cluster.base}/{FLEET_APP}"
    warm_up(anchor, TOOLS_MODEL)
    warm_up(anchor, REASONING_MODEL)
    yield Fleet(anchor, tools_dir, reasoning_dir)
    cluster.delete(FLEET_APP, wait=False)


@pytest.fixture(scope="session")
def main_pool_path() -> str:
    if not MAIN_POOL.is_file():
        raise FileNotFoundError(f"the shared trace pool is missing: {MAIN_POOL}")
    return str(MAIN_POOL)
