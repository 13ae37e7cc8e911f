"""Helpers of the ops tests: paths, promtool, PromQL text checks, schema conversion, metric names.

Loaded by conftest.py (fixture ``ops``) by path, so it works under any pytest import mode.
Nothing here starts Ray: the series names CLEAR exports are derived from
deployments/metrics.py by recording which kind of metric each name is created as.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
SCHEMAS = REPO.parent / "shared" / "schemas"
K8S = REPO / "k8s"
RULES = REPO / "monitoring" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "monitoring" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "clear-dashboard.json"
SERVE_CONFIG_GPU = REPO / "serve_config.gpu.yaml"
PRODUCTION_DOC = REPO / "docs" / "operations.md"
#: Kubernetes version the core objects are validated against (kubernetes-validate ships it).
K8S_VERSION = "1.32.0"

#: Ray Serve's own series the dashboard may use (checked against the installed Ray source).
SERVE_BUILTIN_SERIES = {
    "ray_serve_replica_processing_queries": "serve_replica_processing_queries",
    "ray_serve_deployment_processing_latency_ms_bucket": "serve_deployment_processing_latency_ms",
    "ray_serve_deployment_replica_healthy": "serve_deployment_replica_healthy",
}


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- promtool --------------------------------------------------------------------------


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def promql_parses(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool parses every expr (each becomes a recording rule of a temporary rules file)."""
    rules = {"groups": [{"name": "exprs", "rules": [{"record": f"expr:check:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    f = tmp_path / "exprs.yml"
    f.write_text(yaml.safe_dump(rules))
    return run_promtool(promtool, "check", "rules", str(f))


# -- PromQL text helpers -----------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def balanced(expr: str) -> bool:
    """Brackets (), [], {} nest properly and double quotes are closed."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_str = False
    prev = ""
    for ch in expr:
        if in_str:
            if ch == '"' and prev != "\\":
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
        prev = ch
    return not stack and not in_str


def metric_names(expr: str) -> set[str]:
    """The series / recording-rule names an expr selects (functions, labels, keywords left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[str]:
    """The ``{...}`` label-matcher blocks of an expr."""
    return re.findall(r"\{[^}]*\}", expr)


# -- metric names CLEAR exports -----------------------------------------------------------


@lru_cache(maxsize=None)
def clear_metric_kinds() -> dict[str, str]:
    """Name given to ray.serve.metrics -> gauge | counter | histogram, from deployments/metrics.py."""
    import deployments.metrics as m

    kinds: dict[str, str] = {}

    class Recorder:
        def __init__(self, kind: str):
            self.kind = kind

        def __call__(self, name, description, tag_keys=()):
            kinds[name] = self.kind
            return self

        def set(self, *a, **k):
            pass

    saved = (m.gauge, m.counter, m.histogram)
    try:
        m.gauge, m.counter, m.histogram = Recorder("gauge"), Recorder("counter"), Recorder("histogram")
        m.AllocatorMetrics("clear")
        m.IngressMetrics()
        m.LearnerMetrics()
    finally:
        m.gauge, m.counter, m.histogram = saved
    return kinds


def exported_series(name: str, kind: str) -> list[str]:
    """Series Ray 2.x (OpenTelemetry exporter) puts on its metrics port for one metric."""
    base = f"ray_{name}"
    if kind == "counter":
        return [f"{base}_total"]
    if kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]


@lru_cache(maxsize=None)
def clear_series() -> frozenset[str]:
    """Every series name CLEAR exports: deployments.metrics.EXPORTED_NAMES when the serving
    side has filled it from a measurement, else derived from the metric kinds."""
    import deployments.metrics as m

    measured = getattr(m, "EXPORTED_NAMES", None) or {}
    if measured:
        return frozenset(s for names in measured.values() for s in names)
    return frozenset(s for n, k in clear_metric_kinds().items() for s in exported_series(n, k))


# -- Kubernetes schemas ------------------------------------------------------------------


def openapi_to_jsonschema(node, strict: bool = True):
    """A CRD's openAPIV3Schema as a JSON schema jsonschema can check.

    * ``x-kubernetes-int-or-string: true`` becomes ``anyOf: [integer, string]``;
    * with ``strict``, objects with ``properties`` and no ``additionalProperties`` (and not
      ``x-kubernetes-preserve-unknown-fields``) get ``additionalProperties: false``: the API
      server refuses unknown fields under kubectl's default strict field validation, where
      plain pruning would drop them silently, so a typo must fail here too.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v, strict) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if strict and not preserve and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(crd_file: str, version: str = "v1") -> dict:
    # About 1 MB of YAML each: libyaml reads it in a tenth of the time of the pure-Python loader.
    crd = yaml.load((SCHEMAS / "kuberay" / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd_file} has no version {version}")


def schema_errors(schema: dict, instance) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]
