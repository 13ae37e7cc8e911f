"""k8s/: every manifest validates against its schema (KubeRay CRDs, Kubernetes core with
kubernetes-validate, the PrometheusRule JSON schema, a PodMonitor subset), the Ray cluster has
the ports, groups and GPUs the service needs, and the kustomization ties it all together.
Each validator is also shown to reject a broken copy."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from importlib.metadata import version

import pytest
import yaml

# The fields of monitoring.coreos.com/v1 PodMonitor these manifests use (no schema of it is
# vendored): unknown keys and wrong types fail, as they would against the CRD.
PODMONITOR_SUBSET = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
                                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                        "targetLabel": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _docs(ops, name: str) -> list[dict]:
    return ops.load_yaml_docs(ops.K8S / name)


def _kv_errors(obj: dict, ops) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, ops.K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def _meta_errors(meta: dict, ops) -> list[str]:
    """A custom resource's metadata checked as ObjectMeta (it sits in a ConfigMap shell)."""
    return _kv_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, ops)


def _groups(rs: dict) -> dict[str, dict]:
    cfg = rs["spec"]["rayClusterConfig"]
    return {"head": cfg["headGroupSpec"], **{g["groupName"]: g for g in cfg["workerGroupSpecs"]}}


def _ports(group: dict) -> dict[str, int]:
    (container,) = group["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


# -- RayService --------------------------------------------------------------------------


def test_rayservice_validates_against_kuberay_crd(rayservice, rayservice_schema, raycluster_spec_schema, ops):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert ops.schema_errors(rayservice_schema, rayservice) == []
    # the cluster part also against the RayCluster CRD (same spec, checked twice)
    assert ops.schema_errors(raycluster_spec_schema, rayservice["spec"]["rayClusterConfig"]) == []
    assert _meta_errors(rayservice["metadata"], ops) == []


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("typo_key", "'enableInTreeAutoscalling' was unexpected"),
        ("wrong_type", "'four' is not of type 'integer'"),
        ("missing_group_name", "'groupName' is a required property"),
        ("bad_upscaling_mode", "'Eager' is not one of"),
        ("gcs_ft_typo", "'redisAdress' was unexpected"),
        ("gcs_ft_backend", "'memcached' is not one of"),
    ],
)
def test_crd_validator_rejects_broken_rayservice(rayservice, rayservice_schema, ops, breakage, expected):
    cfg = rayservice["spec"]["rayClusterConfig"]
    if breakage == "typo_key":
        cfg["enableInTreeAutoscalling"] = cfg.pop("enableInTreeAutoscaling")
    elif breakage == "wrong_type":
        cfg["workerGroupSpecs"][0]["maxReplicas"] = "four"
    elif breakage == "missing_group_name":
        del cfg["workerGroupSpecs"][1]["groupName"]
    elif breakage == "gcs_ft_typo":
        cfg["gcsFaultToleranceOptions"]["redisAdress"] = cfg["gcsFaultToleranceOptions"].pop("redisAddress")
    elif breakage == "gcs_ft_backend":
        cfg["gcsFaultToleranceOptions"]["backend"] = "memcached"
    else:
        cfg["autoscalerOptions"]["upscalingMode"] = "Eager"
    errors = ops.schema_errors(rayservice_schema, rayservice)
    assert len(errors) == 1 and expected in errors[0], errors


def test_crd_conversion_handles_int_or_string(ops):
    schema = ops.openapi_to_jsonschema(
        {"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True}, "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}}}}
    )
    assert ops.schema_errors(schema, {"q": 1, "free": {"b": 2}}) == []
    assert ops.schema_errors(schema, {"q": "500m"}) == []
    assert ops.schema_errors(schema, {"q": [1]})
    assert ops.schema_errors(schema, {"other": 1})


def test_pod_templates_validate_as_kubernetes_pod_templates(rayservice, ops):
    for name, group in _groups(rayservice).items():
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]}
        assert _kv_errors(obj, ops) == [], name


def test_pod_template_validator_rejects_a_bad_container(rayservice, ops):
    group = _groups(rayservice)["gpu-workers"]
    group["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": group["template"]}
    assert _kv_errors(obj, ops)


def test_cluster_layout(rayservice):
    cfg = rayservice["spec"]["rayClusterConfig"]
    assert cfg["enableInTreeAutoscaling"] is True
    assert cfg["rayVersion"] == version("ray"), "rayVersion should match the Ray the project is tested with"
    groups = _groups(rayservice)
    head_ports = _ports(groups["head"])
    assert {"serve": 8000, "metrics": 8080, "dashboard": 8265, "gcs-server": 6379}.items() <= head_ports.items()
    assert groups["head"]["rayStartParams"].get("num-cpus") == "0", "keep replicas off the head"
    assert {"cpu-workers", "gpu-workers"} <= set(groups)
    for name in ("cpu-workers", "gpu-workers"):
        g = groups[name]
        assert _ports(g).get("metrics") == 8080, name
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    gpu = groups["gpu-workers"]["template"]["spec"]
    limits = gpu["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1, "one vLLM replica per GPU pod"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert gpu["nodeSelector"]
    assert any(v["name"] == "dshm" and v["emptyDir"].get("medium") == "Memory" for v in gpu["volumes"])
    cpu_limits = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits


def _deployment_gpus(opts: dict | None, which: str) -> float:
    """GPUs one of the app's own deployments (DeploymentOptions) holds at its min or max scale."""
    opts = opts or {}
    gpus = float(opts.get("num_gpus", 0.0))
    low = opts.get("min_replicas", 1)
    n = low if which == "min" or opts.get("max_replicas") is None else opts["max_replicas"]
    return gpus * n


def gpu_pods_needed(serve: dict, which: str, gpus_per_pod: int) -> int:
    """One-GPU pods the Serve graph needs at its min or max scale: each vLLM replica holds
    tensor_parallel_size whole GPUs (Ray Serve LLM bundles of GPU: 1, nothing shares them);
    the fractional GPUs of the other deployments share whole GPUs among themselves."""
    whole, fractional = 0, 0.0
    for app in serve["applications"]:
        args = app.get("args") or {}
        engine = args.get("engine") or {}
        if engine.get("kind") == "vllm":
            llm = engine.get("llm_config") or {}
            tp = int((llm.get("engine_kwargs") or {}).get("tensor_parallel_size", 1))
            # an autoscaling_config inside llm_config.deployment_config wins (deployments/engines/vllm.py)
            autoscaling = (llm.get("deployment_config") or {}).get("autoscaling_config") or {}
            key, default = ("min_replicas", 1) if which == "min" else ("max_replicas", 2)
            whole += tp * int(autoscaling.get(key, engine.get(key, default)))
        for part in ("predictor", "ingress", "engine"):
            fractional += _deployment_gpus((args.get(part) or {}).get("deployment"), which)
    return -(-(whole + math.ceil(fractional - 1e-9)) // gpus_per_pod)


def test_gpu_group_fits_the_serve_graph(rayservice):
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert any((a.get("args") or {}).get("engine", {}).get("kind") == "vllm" for a in serve["applications"]), "no vLLM engine"
    gpu = _groups(rayservice)["gpu-workers"]
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu["maxReplicas"] >= gpu_pods_needed(serve, "max", per_pod), "gpu-workers cannot hold the graph at its max scale"
    assert gpu["minReplicas"] >= gpu_pods_needed(serve, "min", per_pod), "gpu-workers minReplicas below the graph's min scale"


def test_gpu_pod_count_rule():
    vllm = {"kind": "vllm", "min_replicas": 1, "max_replicas": 4}
    serve = {"applications": [{"args": {"engine": vllm, "predictor": {"deployment": {"num_gpus": 0.1}}}}]}
    assert gpu_pods_needed(serve, "max", 1) == 5 and gpu_pods_needed(serve, "min", 1) == 2
    serve["applications"][0]["args"]["predictor"] = {}
    assert gpu_pods_needed(serve, "max", 1) == 4
    vllm["llm_config"] = {"engine_kwargs": {"tensor_parallel_size": 2}}
    assert gpu_pods_needed(serve, "max", 1) == 8 and gpu_pods_needed(serve, "max", 8) == 1


def test_predictor_checkpoint_is_in_the_image(rayservice, ops):
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    dockerfile = (ops.K8S / "image" / "Dockerfile").read_text()
    for app in serve["applications"]:
        predictor = (app.get("args") or {}).get("predictor") or {}
        advanced = predictor.get("advanced") or {}
        for key in ("checkpoint_path", "table_path", "pool_path"):
            path = predictor.get(key) or advanced.get(key)
            if path and path.startswith("/"):
                assert f" {path}" in dockerfile, f"{key} {path} is neither copied into the image nor mounted"


def test_image_and_dockerfile_agree(rayservice, ops):
    images = {c["image"] for g in _groups(rayservice).values() for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    kustomization = yaml.safe_load((ops.K8S / "kustomization.yaml").read_text())
    assert images.pop().split(":")[0] in {i["name"] for i in kustomization["images"]}
    dockerfile = (ops.K8S / "image" / "Dockerfile").read_text()
    assert f"rayproject/ray-llm:{version('ray')}-" in dockerfile


# -- core objects ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["namespace.yaml", "grafana-dashboard-configmap.yaml", "redis.yaml"])
def test_core_objects_validate_with_kubernetes_validate(ops, name):
    for doc in _docs(ops, name):
        assert _kv_errors(doc, ops) == [], name


def test_kubernetes_validate_rejects_broken_core_objects(ops):
    (cm,) = _docs(ops, "grafana-dashboard-configmap.yaml")
    bad = json.loads(json.dumps(cm))
    bad["metadata"]["labels"]["grafana_dashboard"] = 1  # must be a string
    assert _kv_errors(bad, ops)
    bad = json.loads(json.dumps(cm))
    bad["dta"] = bad.pop("data")
    assert _kv_errors(bad, ops)


def test_dashboard_configmap_is_for_the_grafana_sidecar(ops):
    (cm,) = _docs(ops, "grafana-dashboard-configmap.yaml")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key.endswith(".json")
    json.loads(cm["data"][key])


# -- monitoring.coreos.com -----------------------------------------------------------------


def test_prometheusrule_validates_against_its_schema(ops, prometheusrule_schema):
    (rule,) = _docs(ops, "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert ops.schema_errors(prometheusrule_schema, rule) == []
    assert _meta_errors(rule["metadata"], ops) == []


def test_prometheusrule_schema_rejects_broken_rules(ops, prometheusrule_schema):
    (rule,) = _docs(ops, "prometheusrule.yaml")
    alert = next(r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r)
    alert["for"] = "5 minutes"
    assert ops.schema_errors(prometheusrule_schema, rule)
    (rule,) = _docs(ops, "prometheusrule.yaml")
    del rule["spec"]["groups"][0]["name"]
    assert ops.schema_errors(prometheusrule_schema, rule)


def test_podmonitors_scrape_head_and_workers_with_cluster_label(ops, rayservice):
    monitors = {d["metadata"]["name"]: d for d in _docs(ops, "podmonitor.yaml")}
    assert len(monitors) == 2
    groups = _groups(rayservice)
    by_node_type = {}
    for m in monitors.values():
        assert ops.schema_errors(PODMONITOR_SUBSET, m) == [], m["metadata"]["name"]
        assert _meta_errors(m["metadata"], ops) == []
        node_type = m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        by_node_type[node_type] = m
        pod_groups = [g for n, g in groups.items() if (n == "head") == (node_type == "head")]
        for ep in m["spec"]["podMetricsEndpoints"]:
            for g in pod_groups:
                assert ep["port"] in _ports(g), f"{ep['port']} is not a named port of {node_type} pods"
            assert any(
                r.get("sourceLabels") == ["__meta_kubernetes_pod_label_ray_io_cluster"] and r.get("targetLabel") == "ray_io_cluster"
                for r in ep.get("relabelings", [])
            ), f"{node_type} endpoint {ep['port']} does not set ray_io_cluster"
    assert set(by_node_type) == {"head", "worker"}
    assert any(ep["port"] == "metrics" for ep in by_node_type["worker"]["spec"]["podMetricsEndpoints"])


def test_podmonitor_subset_rejects_a_typo(ops):
    m = _docs(ops, "podmonitor.yaml")[0]
    m["spec"]["podMetricEndpoints"] = m["spec"].pop("podMetricsEndpoints")
    assert ops.schema_errors(PODMONITOR_SUBSET, m)


# -- kustomization -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest(ops):
    k = yaml.safe_load((ops.K8S / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization" and k["namespace"]
    manifests = {p.name for p in ops.K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == manifests
    (ns,) = _docs(ops, "namespace.yaml")
    assert ns["metadata"]["name"] == k["namespace"]


def test_kustomize_build(ops):
    kubectl = shutil.which("kubectl")
    # kubectl ships with this project's machine image (developers and CI alike).
    assert kubectl is not None, "kubectl is missing: install it to build the kustomization"
    r = subprocess.run([kubectl, "kustomize", str(ops.K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodMonitor", "PodMonitor",
                     "PrometheusRule", "RayService", "Service"]
    assert all(d["metadata"].get("namespace") == "clear" for d in docs if d["kind"] != "Namespace")


# -- GCS fault tolerance -----------------------------------------------------------------


def test_the_gcs_writes_through_to_the_redis_the_kustomization_deploys(rayservice, ops):
    """The RayService's gcsFaultToleranceOptions point at k8s/redis.yaml's Service and Secret, and the Serve
    graph keeps its books in the GCS under a name, so a head pod that restarts finds them."""
    ft = rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    docs = {d["kind"]: d for d in _docs(ops, "redis.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (env,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == env["valueFrom"]["secretKeyRef"]
    assert "--requirepass \"$REDIS_PASSWORD\"" in container["args"][0] and "--appendonly yes" in container["args"][0]
    # KubeRay keys the GCS in Redis by the RayCluster's UID unless told otherwise; a fixed namespace would be
    # shared by the old and the new cluster of a RayService upgrade, which run side by side.
    assert "externalStorageNamespace" not in ft
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    allocator = serve_config["applications"][0]["args"]["allocator"]
    assert allocator.get("state_store", "gcs") == "gcs" and allocator["budget_name"]
