"""The series names the rules and the dashboard query are the ones Ray really exports.

No cluster: the metrics of deployments/metrics.py are pushed through the recorder a Ray
node's metrics agent exports with (OpenTelemetry -> Prometheus, Ray's own code), in a
subprocess, and the Prometheus text it produces is read back. Nothing here restates Ray's
naming rule (counters get ``_total``, histograms ``_bucket``/``_sum``/``_count``...): every
``ray_clear_*`` name that monitoring/prometheus/rules.yml and the Grafana dashboard select
must appear, as written, in what the real exporter produced, so a rule or panel querying a
name Ray does not export (or a metric renamed in deployments/metrics.py) fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

PREFIX = "ray_clear_"

SCRIPT = r"""
import json, sys
from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder
from prometheus_client import REGISTRY, generate_latest

kinds = json.loads(sys.argv[1])
rec = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=3600)
tags = {"application": "clear", "deployment": "Allocator", "replica": "r1", "policy": "clear"}
for name, kind in kinds.items():
    if kind == "counter":
        rec.register_counter_metric(name, "d")
    elif kind == "gauge":
        rec.register_gauge_metric(name, "d")
    else:
        rec.register_histogram_metric(name, "d", [0.001, 0.01])
    rec.set_metric_value(name, tags, 0.002)
print(generate_latest(REGISTRY).decode())
"""


def _exposed_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def exported(ops) -> set[str]:
    """Series names Ray's own recorder puts on the metrics port for deployments/metrics.py."""
    kinds = ops.clear_metric_kinds()
    assert {"counter", "gauge", "histogram"} <= set(kinds.values()), kinds
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kinds)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    names = _exposed_names(r.stdout)
    assert any(n.startswith(PREFIX) for n in names), r.stdout[-2000:]
    return names


def referenced_series(ops, panels_module) -> dict[str, set[str]]:
    """``ray_clear_*`` series name -> where it is selected (rule names, panel titles)."""
    used: dict[str, set[str]] = {}
    rules = yaml.safe_load(ops.RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in ops.metric_names(str(rule["expr"])):
                used.setdefault(name, set()).add(f"rules.yml: {rule.get('record') or rule.get('alert')}")
    for title, expr in panels_module.panel_queries(ops.DASHBOARD):
        for name in ops.metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard: {title}")
    return {name: where for name, where in used.items() if name.startswith(PREFIX)}


def test_ray_exports_the_names_rules_and_dashboard_use(exported, ops, panels_module):
    used = referenced_series(ops, panels_module)
    # the rules and the dashboard do select our series (the parse found them)
    assert len(used) >= 10, sorted(used)
    assert any(w.startswith("rules.yml") for ws in used.values() for w in ws)
    assert any(w.startswith("dashboard") for ws in used.values() for w in ws)
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, f"selected but never exported by Ray: {missing}"


def test_declared_exported_names_are_what_ray_exports(exported):
    """deployments.metrics.EXPORTED_NAMES (what the cluster tests and operators read) is exactly
    what Ray exports under our prefix: nothing missing, nothing extra (no deprecated gauge twin
    of a counter, no unit suffix)."""
    import deployments.metrics as m

    declared_names = {s for names in m.EXPORTED_NAMES.values() for s in names}
    ours = {n for n in exported if n.startswith(PREFIX)}
    assert declared_names == ours, {"declared, not exported": sorted(declared_names - ours),
                                    "exported, not declared": sorted(ours - declared_names)}
