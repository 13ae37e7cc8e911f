"""The PromQL of every panel of a Grafana dashboard, ready to send to Prometheus.

``panel_queries(path)`` reads a dashboard JSON (monitoring/grafana/clear-dashboard.json)
and returns ``(panel title, expr)`` for every query target of every panel (rows'
nested panels included), with Grafana's template variables replaced so that the
expression is plain PromQL:

* query / custom variables with "All" (the label filters ``$ray_io_cluster``,
  ``$application``) become their ``allValue`` regex, ``.*`` by default, so
  ``application=~"$application"`` matches every application (and a missing label);
* textbox / constant variables become their current value (``$engine_deployment``
  becomes ``ReplayEngine|LLMServer.*``);
* Grafana's interval macros (``$__rate_interval``, ``$__interval``, ``$__range``...)
  become ``rate_interval`` (1m unless told otherwise).

Pure standard library: used by the unit tests (every expr parses with promtool) and
by the integration test that checks every panel returns data from a live Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

#: Grafana's built-in time macros, replaced by a fixed duration.
INTERVAL_MACROS = ("__rate_interval", "__interval", "__range", "__range_s", "__range_ms", "__interval_ms")

# $name, ${name}, ${name:format}, [[name]]
_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def variable_values(dashboard: dict) -> dict[str, str]:
    """Template variable name -> the text that stands for it in a plain PromQL query."""
    values: dict[str, str] = {}
    for var in (dashboard.get("templating") or {}).get("list", []):
        name, kind = var.get("name"), var.get("type")
        if not name or kind == "datasource":
            continue
        if kind in ("textbox", "constant"):
            current = (var.get("current") or {}).get("value")
            values[name] = str(current if current not in (None, "") else var.get("query", ""))
        else:  # query, custom, interval...: every value
            values[name] = var.get("allValue") or ".*"
    return values


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """``expr`` with every template variable and interval macro replaced."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in INTERVAL_MACROS:
            return rate_interval
        if name in values:
            return values[name]
        raise KeyError(f"dashboard query uses an undefined template variable ${name}: {expr}")

    return _VAR.sub(repl, expr)


def iter_panels(panels: list[dict]):
    """Every panel, rows' collapsed children included."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels") or [])


def panel_queries(path: str | Path, rate_interval: str = "1m") -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every query target of the dashboard at ``path``."""
    dashboard = json.loads(Path(path).read_text())
    values = variable_values(dashboard)
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if expr:
                out.append((panel.get("title", ""), substitute(expr, values, rate_interval)))
    return out


if __name__ == "__main__":  # python monitoring/panels.py [dashboard.json]: print the queries
    import sys

    default = Path(__file__).resolve().parent / "grafana" / "clear-dashboard.json"
    for title, expr in panel_queries(sys.argv[1] if len(sys.argv) > 1 else default):
        print(f"{title}\n    {expr}")
