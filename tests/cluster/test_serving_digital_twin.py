"""A small digital twin: the live service within 2 points of the offline bench."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def load_twin():
    spec = importlib.util.spec_from_file_location("digital_twin", REPO_ROOT / "benchmarks" / "digital_twin.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digital_twin"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("policy", ["clear", "uniform"])
def test_live_service_matches_offline_bench(cluster, main_pool_path, tmp_path, policy):
    from clear_core.traces import load_pool, make_stream

    twin = load_twin()
    problems = load_pool(main_pool_path)
    stream = make_stream(problems, "balanced", 200, seed=3)
    r = twin.run_twin(
        cluster.deploy, cluster.delete, Path(main_pool_path), stream, problems, policy, 512.0,
        clients=16, sigma=0.5, seed=3, window=128, workdir=tmp_path,
    )
    print(f"\n{policy}: offline {r.offline_accuracy:.3f} live {r.live_accuracy:.3f} gap {r.gap_points:+.1f} pts")
    assert r.live_errors == 0
    assert r.live_tokens_allocated <= r.budget_tokens  # per-query mode: N * b, as offline
    assert abs(r.gap_points) <= 2.0
    if policy == "uniform":
        assert r.live_accuracy == pytest.approx(r.offline_accuracy)
    else:
        assert r.live_abandoned > 0  # CLEAR abandons at this budget, live as offline
