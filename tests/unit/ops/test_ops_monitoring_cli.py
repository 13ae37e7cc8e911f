"""The monitoring command lines: panels.py reads --help as help, not a path; ray_targets.py asks the
cluster at an explicit address for its metrics ports (no /tmp/ray guess); prometheus.yml reads the
targets file ray_targets.py writes, never a machine-global one."""

from __future__ import annotations

import json

import yaml

from tests.cli_support import assert_one_line_error, run_cli


def test_panels_help_is_help(panels_module):
    proc = run_cli("monitoring/panels.py", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python monitoring/panels.py")
    assert "(default: 1m)" in proc.stdout


def test_panels_prints_every_query_of_the_default_dashboard(panels_module, ops):
    proc = run_cli("monitoring/panels.py", "--rate-interval", "2m")
    assert proc.returncode == 0, proc.stderr
    queries = panels_module.panel_queries(ops.DASHBOARD, "2m")
    assert proc.stdout.count("\n    ") == len(queries) > 0 and "[2m]" in proc.stdout


def test_panels_errors_are_one_line(tmp_path):
    assert_one_line_error(run_cli("monitoring/panels.py", str(tmp_path / "nope.json")),
                          "python monitoring/panels.py: error: ")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert_one_line_error(run_cli("monitoring/panels.py", str(bad)), f"python monitoring/panels.py: error: {bad}")
    assert_one_line_error(run_cli("monitoring/panels.py", "--bogus"), "python monitoring/panels.py: error:",
                          usage=True)


def test_ray_targets_needs_an_explicit_address():
    proc = run_cli("monitoring/ray_targets.py", env={"RAY_ADDRESS": ""})  # unset for the script
    assert_one_line_error(proc, "python monitoring/ray_targets.py: error: the following arguments are required: "
                          "--address", usage=True)


def test_ray_targets_lists_the_live_nodes_metrics_ports(ops):
    mod = ops.load_module(ops.REPO / "monitoring" / "ray_targets.py", "clear_ray_targets_under_test")
    nodes = [
        {"NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 51234, "Alive": True},
        {"NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 51999, "Alive": False},  # gone
        {"NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080, "alive": True},  # Ray's other spelling
    ]
    targets = mod.metrics_targets(nodes)
    assert targets == ["10.0.0.1:51234", "10.0.0.3:8080"]
    assert mod.file_sd(targets) == [{"labels": {"job": "ray"}, "targets": targets}]


def test_prometheus_reads_a_targets_file_beside_it_not_a_machine_global_one(ops, tmp_path):
    path = ops.REPO / "monitoring" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files == ["ray_targets.json"]  # relative: Prometheus resolves it beside prometheus.yml
    assert "/tmp/ray" not in json.dumps(config)
