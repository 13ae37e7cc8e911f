"""Generated manifests never drift from their sources, and serve_config.gpu.yaml (the GPU
Serve graph the RayService runs) is a valid Serve config and a valid CLEAR app config.

serve_config.gpu.yaml is required: a missing file fails here (it is what k8s/rayservice.yaml
deploys), it is not skipped."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml


@pytest.fixture(scope="module")
def serve_config_text(ops) -> str:
    if not ops.SERVE_CONFIG_GPU.is_file():
        pytest.fail(f"{ops.SERVE_CONFIG_GPU.name} is missing: k8s/rayservice.yaml deploys it (see scripts/gen_k8s.py)", pytrace=False)
    return ops.SERVE_CONFIG_GPU.read_text()


MINIMAL_SERVE_CONFIG = "applications:\n  - name: clear\n    import_path: deployments.app:build_app\n"


def _copy_sources(ops, gen_k8s, root):
    """A scratch repository with the generator's sources and up-to-date manifests (with a
    minimal serve config when serve_config.gpu.yaml is missing: that is tested above)."""
    for rel in ("k8s", "monitoring", "scripts"):
        shutil.copytree(ops.REPO / rel, root / rel)
    target = root / ops.SERVE_CONFIG_GPU.name
    if ops.SERVE_CONFIG_GPU.is_file():
        shutil.copy(ops.SERVE_CONFIG_GPU, target)
    else:
        target.write_text(MINIMAL_SERVE_CONFIG)
    assert gen_k8s.main(["--root", str(root)]) == 0


def test_serve_config_gpu_exists(serve_config_text):
    assert serve_config_text.strip()


def test_serve_config_gpu_validates_with_ray_serve_schema(serve_config_text):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(serve_config_text))
    assert [a.import_path for a in schema.applications] == ["deployments.app:build_app"] * len(schema.applications)


def test_ray_serve_schema_rejects_a_broken_config():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate({"applications": [{"name": "clear", "route_prefix": "/"}]})  # no import_path
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate({"applications": [{"name": "clear", "import_path": "deployments.app:build_app", "args": "x"}]})


def test_serve_config_gpu_args_are_a_valid_app_config(serve_config_text):
    """build_app would accept the args (extra keys are refused there: a typo fails here)."""
    from deployments.config import AppConfig, VLLMEngineConfig

    for app in yaml.safe_load(serve_config_text)["applications"]:
        cfg = AppConfig.model_validate(app.get("args") or {})
        assert isinstance(cfg.engine, VLLMEngineConfig), "the GPU graph runs vLLM"


def test_rayservice_serve_config_is_serve_config_gpu_verbatim(ops, serve_config_text):
    (rs,) = ops.load_yaml_docs(ops.K8S / "rayservice.yaml")
    assert rs["spec"]["serveConfigV2"] == serve_config_text, "run: python scripts/gen_k8s.py"


def test_prometheusrule_spec_is_rules_file(ops):
    (rule,) = ops.load_yaml_docs(ops.K8S / "prometheusrule.yaml")
    assert rule["spec"] == yaml.safe_load(ops.RULES.read_text()), "run: python scripts/gen_k8s.py"


def test_configmap_holds_the_dashboard_verbatim(ops):
    (cm,) = ops.load_yaml_docs(ops.K8S / "grafana-dashboard-configmap.yaml")
    assert cm["data"]["clear-dashboard.json"] == ops.DASHBOARD.read_text(), "run: python scripts/gen_k8s.py"


def test_regenerating_gives_byte_identical_files(ops, gen_k8s, serve_config_text):
    outputs = gen_k8s.render_all(ops.REPO)
    assert {p.as_posix() for p in outputs} == {"k8s/rayservice.yaml", "k8s/prometheusrule.yaml", "k8s/grafana-dashboard-configmap.yaml"}
    for rel, text in outputs.items():
        assert (ops.REPO / rel).read_text() == text, f"{rel} is stale: run python scripts/gen_k8s.py"
    assert gen_k8s.main(["--check"]) == 0


@pytest.mark.parametrize(
    "source, stale_file",
    [
        ("monitoring/grafana/clear-dashboard.json", "k8s/grafana-dashboard-configmap.yaml"),
        ("monitoring/prometheus/rules.yml", "k8s/prometheusrule.yaml"),
        ("serve_config.gpu.yaml", "k8s/rayservice.yaml"),
    ],
)
def test_drift_is_detected_and_fixed(ops, gen_k8s, tmp_path, source, stale_file):
    """An edited source makes --check fail on exactly its manifest; generating fixes it."""
    _copy_sources(ops, gen_k8s, tmp_path)
    src = tmp_path / source
    if source.endswith(".json"):
        d = json.loads(src.read_text())
        d["title"] += " (edited)"
        src.write_text(json.dumps(d, indent=2) + "\n")
    else:
        src.write_text(src.read_text() + "# edited\n")
    assert [p.as_posix() for p in gen_k8s.stale(tmp_path)] == [stale_file]
    assert gen_k8s.main(["--check", "--root", str(tmp_path)]) == 1
    assert gen_k8s.main(["--root", str(tmp_path)]) == 0
    assert gen_k8s.stale(tmp_path) == []
    assert "# edited" in (tmp_path / stale_file).read_text() or "(edited)" in (tmp_path / stale_file).read_text()


def test_generator_keeps_the_hand_written_cluster(ops, gen_k8s):
    manifest = (ops.K8S / "rayservice.yaml").read_text()
    out = gen_k8s.render_rayservice(manifest, "applications: []\n")
    head = manifest[: manifest.index("  serveConfigV2:")]
    assert out.startswith(head)
    assert yaml.safe_load(out)["spec"]["serveConfigV2"] == "applications: []\n"


def test_generator_refuses_what_it_cannot_embed(ops, gen_k8s, tmp_path):
    manifest = (ops.K8S / "rayservice.yaml").read_text()
    with pytest.raises(gen_k8s.GenerationError):
        gen_k8s.render_rayservice(manifest + "  suspend: false\n", "applications: []\n")  # key after serveConfigV2
    with pytest.raises(yaml.YAMLError):
        gen_k8s.render_rayservice(manifest, "applications: [\n")
    with pytest.raises(gen_k8s.GenerationError):
        gen_k8s.render_prometheus_rule("rules: []\n")
    (tmp_path / "k8s").mkdir()
    assert gen_k8s.main(["--check", "--root", str(tmp_path)]) == 2  # sources missing
