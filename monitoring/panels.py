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


DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "clear-dashboard.json"


def main(argv: list[str] | None = None) -> int:
    """``python monitoring/panels.py [DASHBOARD] [--rate-interval 1m]``: print every panel's PromQL."""
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(prog="python monitoring/panels.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dashboard", nargs="?", type=Path, default=DEFAULT_DASHBOARD, help="Grafana dashboard JSON")
    p.add_argument("--rate-interval", default="1m", help="what $__rate_interval and the other interval macros become")
    args = p.parse_args(argv)
    try:
        queries = panel_queries(args.dashboard, args.rate_interval)
    except (OSError, ValueError, KeyError) as exc:  # no file, not JSON, an undefined variable: one line
        why = f"{exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc).strip("'\"")
        print(f"{p.prog}: error: {args.dashboard}: {' '.join(why.split())}", file=sys.stderr)
        return 2
    try:
        for title, expr in queries:
            print(f"{title}\n    {expr}")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` stopped reading: not an error
        sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
