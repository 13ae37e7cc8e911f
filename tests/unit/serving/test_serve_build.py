"""`serve build` works on the app: the real command line in a subprocess (it starts no
cluster), its YAML validated with Ray's own schema, and the import path it writes
resolved the way `serve deploy` resolves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
#: The graph of the embedded default, as README's serving section draws it.
EXPECTED_DEPLOYMENTS = {"Ingress", "Allocator", "ReplayEngine", "Learner"}  # the predictor runs in the ingress
#: The console script `serve` is exactly this (the venv's bin/serve).
SERVE_CLI = "import sys; from ray.serve.scripts import cli; sys.exit(cli())"


def _serve_build(import_path: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SERVE_CLI, "build", import_path, "--app-dir", str(REPO), "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("serve-build") / "config.yaml"
    proc = _serve_build("deployments.app:app", out)
    assert proc.returncode == 0, f"serve build failed:\n{proc.stderr[-3000:]}"
    return yaml.safe_load(out.read_text())


def test_serve_build_writes_a_valid_deploy_config(built):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(built)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:app"


def test_serve_build_names_every_deployment_of_the_graph(built):
    (app,) = built["applications"]
    names = [d["name"] for d in app["deployments"]]
    assert sorted(names) == sorted(EXPECTED_DEPLOYMENTS)
    allocator = next(d for d in app["deployments"] if d["name"] == "Allocator")
    assert allocator["num_replicas"] == 1 and "autoscaling_config" not in allocator  # one ledger, one market
    # A rolling update never runs two allocators side by side (two writers of one set of books).
    assert allocator["max_surge_percent"] == 0


def test_the_built_import_path_deploys_without_args(built):
    """`serve deploy` of the written file imports the path and calls it with the (empty) args."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    (app,) = built["applications"]
    resolved = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app.get("args") or {})
    assert isinstance(resolved, Application)


def test_the_builder_still_takes_args_from_a_config():
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    resolved = call_user_app_builder_with_args_if_necessary(import_attr("deployments.app:build_app"), args)
    assert isinstance(resolved, Application)

