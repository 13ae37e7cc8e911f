"""Predictor backends and the lookup table (no Ray cluster)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from deployments.predictor import Predictor, heuristic_prediction
from deployments.predictor_backends import HeuristicPredictor, LookupPredictor


def test_heuristic_grows_with_prompt_length_and_is_bounded():
    tau = HeuristicPredictor().predict(["short", "x" * 200, "y" * 5000, ""])
    assert tau[0] < tau[1] < tau[2]
    assert np.all((tau >= 16) & (tau <= 8192))


def test_lookup_table_by_prompt_and_pool(tmp_path, main_pool):
    table = tmp_path / "pred.jsonl"
    p0, p1 = main_pool[0], main_pool[1]
    table.write_text(
        json.dumps({"id": p0.id, "threshold_tokens": 123.0, "log_sigma": 0.4}) + "\n"
        + json.dumps({"id": "custom/1", "threshold_tokens": 77.0, "log_sigma": 0.2, "prompt": "my prompt"}) + "\n"
    )
    from tests.conftest import MAIN_POOL

    lk = LookupPredictor(str(table), str(MAIN_POOL))
    assert lk.lookup(p0.problem) == (123.0, 0.4)
    assert lk.lookup("  my prompt ") == (77.0, 0.2)
    assert lk.lookup(p1.problem) is None


def test_lookup_rejects_bad_rows(tmp_path):
    from clear_core.errors import InvalidInputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "threshold_tokens": -3}) + "\n")
    with pytest.raises(InvalidInputError):
        LookupPredictor(str(bad))


def test_heuristic_deployment_batch_without_ray():
    pred = Predictor.__new__(Predictor)  # skip the Serve batching setup: test the batch body
    pred.config = __import__("deployments.config", fromlist=["PredictorConfig"]).PredictorConfig()
    pred.heuristic = HeuristicPredictor()
    out = asyncio.run(pred.predict_many(["a", "b" * 100]))
    assert [o["source"] for o in out] == ["heuristic", "heuristic"]
    assert out[0]["threshold_tokens"] < out[1]["threshold_tokens"]
    assert heuristic_prediction("a", "timeout")["fallback_reason"] == "timeout"
