"""monitoring/prometheus/rules.yml: promtool accepts it, its unit tests pass, and every alert
is labelled, annotated, documented and tested (firing and not firing)."""

from __future__ import annotations

import re

import pytest
import yaml


@pytest.fixture(scope="module")
def rules(ops) -> dict:
    return yaml.safe_load(ops.RULES.read_text())


def _all_rules(rules: dict) -> list[dict]:
    return [r for g in rules["groups"] for r in g["rules"]]


def _alerts(rules: dict) -> list[dict]:
    return [r for r in _all_rules(rules) if "alert" in r]


def test_promtool_check_rules(ops, promtool):
    r = ops.run_promtool(promtool, "check", "rules", str(ops.RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_pass(ops, promtool):
    r = ops.run_promtool(promtool, "test", "rules", str(ops.RULES_TEST))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rejects_a_broken_rules_file(ops, promtool, tmp_path):
    """The check can fail: an unbalanced parenthesis is reported."""
    broken = ops.RULES.read_text().replace("(rate(ray_clear_tokens_allocated_total[5m]))", "(rate(ray_clear_tokens_allocated_total[5m])", 1)
    assert broken != ops.RULES.read_text()
    f = tmp_path / "rules.yml"
    f.write_text(broken)
    r = ops.run_promtool(promtool, "check", "rules", str(f))
    assert r.returncode != 0, r.stdout


def test_unit_tests_catch_a_wrong_threshold(ops, promtool, tmp_path):
    """The unit tests can fail: with ClearAbandonmentHigh's threshold raised past the test
    data's 99.5%, the expected alert no longer fires and promtool says so."""
    text = ops.RULES.read_text()
    alert_at = text.index("alert: ClearAbandonmentHigh")
    head, tail = text[:alert_at], text[alert_at:]
    tail = tail.replace("cluster_application:clear_abandonment:ratio_rate5m > 0.5", "cluster_application:clear_abandonment:ratio_rate5m > 0.999", 1)
    assert tail != text[alert_at:]
    (tmp_path / "rules.yml").write_text(head + tail)
    (tmp_path / "rules_test.yml").write_text(ops.RULES_TEST.read_text())
    r = ops.run_promtool(promtool, "test", "rules", str(tmp_path / "rules_test.yml"))
    assert r.returncode != 0
    assert "ClearAbandonmentHigh" in r.stdout + r.stderr


def test_every_alert_has_severity_summary_description_and_runbook(rules, ops):
    alerts = _alerts(rules)
    assert len(alerts) >= 6
    doc = ops.PRODUCTION_DOC.read_text() if ops.PRODUCTION_DOC.is_file() else ""
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+\s+(.*)$", doc, re.M)}
    for a in alerts:
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in {"warning", "critical"}, name
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert ann.get(key, "").strip(), f"{name} has no {key} annotation"
        anchor = f"docs/operations.md#{name.lower()}"
        assert ann["runbook"].startswith(anchor), f"{name}: runbook should start with {anchor}"
        assert name.lower() in headings, f"docs/operations.md has no heading for {name}"


def test_names_are_unique_and_conventional(rules):
    names = [r.get("record") or r.get("alert") for r in _all_rules(rules)]
    assert len(names) == len(set(names))
    for r in _all_rules(rules):
        if "record" in r:  # level:metric:operations
            assert re.fullmatch(r"[a-z_]+:clear_[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]
        else:
            assert re.fullmatch(r"Clear[A-Z][A-Za-z]+", r["alert"]), r["alert"]


def test_rules_select_only_series_the_service_exports(rules, ops):
    records = {r["record"] for r in _all_rules(rules) if "record" in r}
    known = set(ops.clear_series()) | records
    for r in _all_rules(rules):
        unknown = ops.metric_names(str(r["expr"])) - known
        assert not unknown, f"{r.get('record') or r.get('alert')} selects unknown series {sorted(unknown)}"


def test_rules_aggregate_by_cluster_and_application(rules):
    for r in _all_rules(rules):
        expr = str(r["expr"])
        for labels in re.findall(r"\b(?:sum|max|min|avg) by \(([^)]*)\)", expr):
            got = {s.strip() for s in labels.split(",")}
            assert {"ray_io_cluster", "application"} <= got, f"{r.get('record') or r.get('alert')}: by ({labels})"


def test_every_alert_is_tested_firing_and_not_firing(rules, ops):
    tests = yaml.safe_load(ops.RULES_TEST.read_text())["tests"]
    fired, quiet = set(), set()
    for case in tests:
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in _alerts(rules)}
    assert names - fired == set(), f"never expected to fire: {sorted(names - fired)}"
    assert names - quiet == set(), f"never expected to stay quiet: {sorted(names - quiet)}"


def test_metric_names_helper_finds_names_and_skips_functions(ops):
    expr = 'sum by (le) (rate(ray_x_bucket{a="b(c)"}[5m])) / on (application) group_left ray_y or vector(0)'
    assert ops.metric_names(expr) == {"ray_x_bucket", "ray_y"}
