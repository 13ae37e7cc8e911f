"""The series names the rules and the dashboard query are the ones Ray really exports.

No cluster: the metrics of deployments/metrics.py are pushed through the recorder a Ray
node's metrics agent exports with (OpenTelemetry -> Prometheus, Ray's own code), in a
subprocess, and the Prometheus text it produces is read back. This is what tells a counter
becomes ``ray_<name>_total`` and a histogram ``ray_<name>_bucket``.
"""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_ray_exports_the_names_rules_and_dashboard_use(ops):
    kinds = ops.clear_metric_kinds()
    assert {"counter", "gauge", "histogram"} <= set(kinds.values())
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kinds)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    exposed = _exposed_names(r.stdout)
    expected = {s for n, k in kinds.items() for s in ops.exported_series(n, k)}
    assert expected <= exposed, sorted(expected - exposed)
    # and nothing else under our prefix (no deprecated gauge twin of a counter, no unit suffix)
    assert {n for n in exposed if n.startswith("ray_clear_")} == expected


def test_measured_names_agree_when_recorded(ops):
    """deployments.metrics.EXPORTED_NAMES, once filled from a live run, must contain every
    name derived here (the rules and the dashboard are checked against the derived set)."""
    import deployments.metrics as m

    measured = {s for names in (getattr(m, "EXPORTED_NAMES", None) or {}).values() for s in names}
    if measured:
        derived = {s for n, k in ops.clear_metric_kinds().items() for s in ops.exported_series(n, k)}
        assert derived <= measured, sorted(derived - measured)
