"""monitoring/grafana/clear-dashboard.json: variables, datasource, and PromQL that parses,
filters by cluster and application, and selects only series that exist."""

from __future__ import annotations

import json
import re

import pytest


@pytest.fixture(scope="module")
def dashboard(ops) -> dict:
    return json.loads(ops.DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def _raw_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets") or []]


def test_dashboard_identity_and_variables(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("ray_io_cluster", "application"):
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["allValue"] == ".*", name
        assert v["datasource"]["uid"] == "${datasource}"
        assert name in v["definition"]  # label_values(..., <label>)


def test_every_panel_uses_the_datasource_variable(dashboard):
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_panel_ids_and_titles_unique_and_layout_in_grid(dashboard):
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in _panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles name the queries of panel_queries()"
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_every_selector_filters_by_cluster_and_application(dashboard, ops):
    for title, expr in _raw_exprs(dashboard):
        sels = ops.selectors(expr)
        assert sels, f"{title}: {expr}"
        for sel in sels:
            assert 'ray_io_cluster=~"$ray_io_cluster"' in sel and 'application=~"$application"' in sel, f"{title}: {sel}"


def test_exprs_balanced(dashboard, ops):
    for title, expr in _raw_exprs(dashboard):
        assert ops.balanced(expr), f"{title}: {expr}"


def test_balanced_check_rejects_broken_exprs(ops):
    assert ops.balanced('sum(rate(x{a="(b"}[5m]))')
    for bad in ('sum(rate(x[5m])', 'sum(rate(x{a="b"}[5m)))', 'x{a="b}', 'sum(x])'):
        assert not ops.balanced(bad), bad


def test_panels_select_only_exported_or_serve_builtin_series(dashboard, ops, panels_module):
    known = set(ops.clear_series()) | set(ops.SERVE_BUILTIN_SERIES)
    for title, expr in panels_module.panel_queries(ops.DASHBOARD):
        unknown = ops.metric_names(expr) - known
        assert not unknown, f"{title}: unknown series {sorted(unknown)}"


def test_serve_builtin_series_exist_in_installed_ray(ops):
    """The Ray Serve series the dashboard uses are created by the installed Ray."""
    import importlib.util
    from pathlib import Path

    serve_dir = Path(importlib.util.find_spec("ray").origin).parent / "serve" / "_private"
    source = "".join(p.read_text(errors="ignore") for p in serve_dir.glob("*.py"))
    for series, name in ops.SERVE_BUILTIN_SERIES.items():
        assert f'"{name}"' in source, f"{series}: Ray Serve no longer defines {name}"


def test_dashboard_covers_the_service(dashboard, ops):
    used = set().union(*(ops.metric_names(e) for _, e in _raw_exprs(dashboard)))
    required = {
        "ray_clear_shadow_price",
        "ray_clear_reservation_price",
        "ray_clear_requests_total",
        "ray_clear_budget_available_tokens",
        "ray_clear_budget_reserved_tokens",
        "ray_clear_budget_spent_tokens",
        "ray_clear_tokens_allocated_total",
        "ray_clear_tokens_generated_total",
        "ray_clear_tokens_refunded_total",
        "ray_clear_clearing_latency_s_bucket",
        "ray_clear_prediction_latency_s_bucket",
        "ray_clear_predictor_fallbacks_total",
        "ray_serve_replica_processing_queries",
    }
    assert required <= used, sorted(required - used)
    exprs = " ".join(e for _, e in _raw_exprs(dashboard))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_every_panel_expr_parses_with_promtool(ops, promtool, panels_module, tmp_path):
    queries = panels_module.panel_queries(ops.DASHBOARD)
    assert len(queries) >= 15
    r = ops.promql_parses(promtool, [e for _, e in queries], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_parse_check_rejects_a_broken_expr(ops, promtool, tmp_path):
    r = ops.promql_parses(promtool, ['sum(rate(ray_clear_requests_total{application=~".*"}[1m])', "up"], tmp_path)
    assert r.returncode != 0


def test_panel_queries_substitutes_every_variable(ops, panels_module):
    queries = panels_module.panel_queries(ops.DASHBOARD)
    titles = {t for t, _ in queries}
    assert {"Shadow price and reservation price", "Engine load per replica"} <= titles
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, f"{title}: {expr}"
    engine = [e for t, e in queries if t == "Engine load per replica"][0]
    assert 'deployment=~"ReplayEngine|LLMServer.*"' in engine
    assert 'application=~".*"' in engine
    assert any("[1m]" in e for _, e in queries)
    assert any("[2m]" in e for _, e in panels_module.panel_queries(ops.DASHBOARD, rate_interval="2m"))


def test_panel_queries_refuses_an_undefined_variable(panels_module):
    with pytest.raises(KeyError, match="nope"):
        panels_module.substitute('up{job=~"$nope"}', {"application": ".*"})
    got = panels_module.substitute('x{a=~"${application:regex}", b=~"[[application]]"}[$__rate_interval]', {"application": ".*"})
    assert got == 'x{a=~".*", b=~".*"}[1m]'
    assert re.search(r"\$", got) is None


def _synthetic_series(ops) -> list[dict]:
    """One scrape's worth of the series a running service exports, on a KubeRay cluster
    (ray_io_cluster set) and on a local run (no ray_io_cluster), counters moving."""
    out = []
    for cluster in ('ray_io_cluster="prod", ', ""):
        alloc = f'{{{cluster}application="clear", deployment="Allocator", replica="a1", policy="clear"}}'
        ing = f'{{{cluster}application="clear", deployment="Ingress", replica="i1"'
        for name, kind in ops.clear_metric_kinds().items():
            base = f"ray_{name}"
            if name == "clear_requests":
                for outcome in ops_outcomes():
                    out.append({"series": f'{base}_total{ing}, outcome="{outcome}", error_type=""}}', "values": "0+60x20"})
            elif name == "clear_predictor_fallbacks":
                out.append({"series": f'{base}_total{ing}, reason="timeout"}}', "values": "0+1x20"})
            elif name == "clear_prediction_latency_s":
                for le, step in (("0.001", 50), ("0.01", 60), ("+Inf", 60)):
                    out.append({"series": f'{base}_bucket{ing}, le="{le}"}}', "values": f"0+{step}x20"})
            elif kind == "counter":
                out.append({"series": f"{base}_total{alloc}", "values": "0+600x20"})
            elif kind == "histogram":
                for le, step in (("0.001", 50), ("0.01", 60), ("+Inf", 60)):
                    out.append({"series": f'{base}_bucket{alloc[:-1]}, le="{le}"}}', "values": f"0+{step}x20"})
                out.append({"series": f"{base}_count{alloc}", "values": "0+60x20"})
            else:
                out.append({"series": f"{base}{alloc}", "values": "5x20"})
        for dep, rep in (("Ingress", "i1"), ("Allocator", "a1"), ("LLMServer:qwen2_5-7b", "l1")):
            labels = f'{cluster}application="clear", deployment="{dep}", replica="{rep}"'
            out.append({"series": f"ray_serve_replica_processing_queries{{{labels}}}", "values": "3x20"})
            out.append({"series": f"ray_serve_deployment_replica_healthy{{{labels}}}", "values": "1x20"})
            for le, step in (("100", 50), ("1000", 60), ("+Inf", 60)):
                out.append({"series": f'ray_serve_deployment_processing_latency_ms_bucket{{{labels}, route="/", le="{le}"}}', "values": f"0+{step}x20"})
    return out


def ops_outcomes() -> tuple[str, ...]:
    from deployments.metrics import OUTCOMES

    return OUTCOMES


def _run_panels_against(ops, promtool, tmp_path, exprs: list[str], series: list[dict]):
    """promtool evaluates `absent(expr)` for every expr over ``series``: an alert = empty panel."""
    import yaml

    rules = {"groups": [{"name": "panels", "rules": [{"alert": f"PanelEmpty{i}", "expr": f"absent({e})"} for i, e in enumerate(exprs)]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules, width=10_000))
    test = {
        "rule_files": ["panels.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [{"eval_time": "15m", "alertname": f"PanelEmpty{i}", "exp_alerts": []} for i in range(len(exprs))],
            }
        ],
    }
    (tmp_path / "panels_test.yml").write_text(yaml.safe_dump(test, width=10_000))
    return ops.run_promtool(promtool, "test", "rules", str(tmp_path / "panels_test.yml"))


def test_every_panel_returns_data_from_a_running_service(ops, promtool, panels_module, tmp_path):
    """Every panel query, evaluated by promtool over the series a service exports (the Ray
    Serve engine deployments included), returns a non-empty result."""
    queries = panels_module.panel_queries(ops.DASHBOARD, rate_interval="5m")
    r = _run_panels_against(ops, promtool, tmp_path, [e for _, e in queries], _synthetic_series(ops))
    empty = [queries[int(i)][0] for i in re.findall(r"alertname: PanelEmpty(\d+)", r.stdout + r.stderr)]
    assert r.returncode == 0, f"panels without data: {sorted(set(empty))}\n{(r.stdout + r.stderr)[-3000:]}"


def test_empty_panel_check_can_fail(ops, promtool, tmp_path):
    series = _synthetic_series(ops)
    r = _run_panels_against(ops, promtool, tmp_path, ['sum(ray_clear_shadow_prize{application=~".*"})'], series)
    assert r.returncode != 0 and "PanelEmpty0" in r.stdout + r.stderr
