"""Fixtures of the ops tests (k8s manifests, Prometheus rules, Grafana dashboard, generator).

Helpers live in ops_support.py, loaded here by path (fixture ``ops``) so the tests work
under any pytest import mode and whatever other test directories are called.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ops = _load(Path(__file__).with_name("ops_support.py"), "clear_ops_support")


@pytest.fixture(scope="session")
def ops():
    return _ops


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install -y prometheus` (Debian) provides it", pytrace=False)
    return path


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    return _ops.crd_schema("ray.io_rayservices.yaml")


@pytest.fixture(scope="session")
def raycluster_spec_schema() -> dict:
    return _ops.crd_schema("ray.io_rayclusters.yaml")["properties"]["spec"]


@pytest.fixture(scope="session")
def prometheusrule_schema() -> dict:
    raw = json.loads((_ops.SCHEMAS / "prometheus-operator" / "prometheusrule_v1.json").read_text())
    return _ops.openapi_to_jsonschema(raw)


@pytest.fixture
def rayservice() -> dict:
    (doc,) = _ops.load_yaml_docs(_ops.K8S / "rayservice.yaml")
    return copy.deepcopy(doc)


@pytest.fixture(scope="session")
def gen_k8s():
    return _load(_ops.REPO / "scripts" / "gen_k8s.py", "clear_gen_k8s_under_test")


@pytest.fixture(scope="session")
def panels_module():
    return _load(_ops.REPO / "monitoring" / "panels.py", "clear_panels_under_test")
