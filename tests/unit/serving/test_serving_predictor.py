"""Predictor backends behind one interface, the lookup table, and the deployment's fallbacks (no Ray cluster)."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from deployments.config import PredictorConfig
from deployments.messages import Prediction
from deployments.predictor import Predictor
from deployments.predictor_backends import (
    BACKENDS,
    HEURISTIC_INTERCEPT,
    HEURISTIC_SLOPE,
    HeuristicPredictor,
    LookupPredictor,
    PredictorBackend,
    heuristic_prediction,
    make_backend,
)


def test_heuristic_is_the_documented_closed_form_and_is_bounded():
    prompts = ["short", "x" * 200, "y" * 5000, ""]
    preds = HeuristicPredictor().predict(prompts)
    tau = np.array([p.threshold_tokens for p in preds])
    # exp(4.914 + 0.159 ln chars), clipped to [16, 8192]; an empty prompt counts as one character.
    expected = [math.exp(HEURISTIC_INTERCEPT + HEURISTIC_SLOPE * math.log(max(len(p), 1))) for p in prompts]
    np.testing.assert_allclose(tau, np.clip(expected, 16, 8192))
    assert tau[0] < tau[1] < tau[2]
    assert {p.source for p in preds} == {"heuristic"} and {p.log_sigma for p in preds} == {0.84}


def test_every_backend_implements_the_interface():
    assert set(BACKENDS) == {"minilm-ridge", "heuristic", "lookup", "checkpoint"}
    for name, cls in BACKENDS.items():
        assert issubclass(cls, PredictorBackend) and cls.name == name
    assert PredictorConfig().backend == "minilm-ridge"  # the default (built in test_serving_minilm_ridge.py)
    assert isinstance(make_backend(PredictorConfig(backend="heuristic")), HeuristicPredictor)  # still selectable


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
    hit, miss, own = lk.predict([p0.problem, p1.problem, "my prompt"], log_sigma=None)
    assert hit == Prediction(123.0, 0.4, "lookup") and miss is None and own.threshold_tokens == 77.0
    assert lk.predict([p0.problem], log_sigma=0.9)[0].log_sigma == 0.9  # the config's override


def test_lookup_rejects_bad_rows(tmp_path):
    from clear_core.errors import InvalidInputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "threshold_tokens": -3}) + "\n")
    with pytest.raises(InvalidInputError):
        LookupPredictor(str(bad))


def test_a_prediction_refuses_bad_values():
    with pytest.raises(ValueError):
        Prediction(float("nan"), 0.5, "x")
    with pytest.raises(ValueError):
        Prediction(10.0, -1.0, "x")
    for runaway in (1.0, -0.1, float("nan"), 1.5):  # a share in [0, 1): 1 would never finish
        with pytest.raises(ValueError):
            Prediction(10.0, 0.5, "x", runaway=runaway)


def test_a_prediction_carries_a_runaway_share_that_defaults_to_zero():
    assert Prediction(10.0, 0.5, "x").runaway == 0.0
    assert Prediction(10.0, 0.5, "x", None, 0.25).runaway == 0.25
    assert HeuristicPredictor().predict(["q"])[0].runaway == 0.0
    assert heuristic_prediction("q", "timeout").runaway == 0.0


class _Counter:
    def __init__(self):
        self.counts: dict[str, float] = {}

    def inc(self, value, tags):
        self.counts[tags["reason"]] = self.counts.get(tags["reason"], 0.0) + value


class _Backend(PredictorBackend):
    """Knows prompts starting with 'k', raises on 'boom'."""

    name = "fake"

    @classmethod
    def from_config(cls, config):
        return cls()

    def predict(self, prompts, log_sigma=None):
        if "boom" in prompts:
            raise RuntimeError("backend down")
        return [Prediction(42.0, 0.3, "fake") if p.startswith("k") else None for p in prompts]


def _deployment(backend) -> Predictor:
    pred = Predictor.__new__(Predictor)  # skip the Serve batching setup: test the batch body
    pred.config, pred.backend, pred._fallbacks, pred.follower = PredictorConfig(), backend, _Counter(), None
    return pred


def test_the_deployment_falls_back_per_missing_prompt_and_counts_it():
    pred = _deployment(_Backend())
    out = asyncio.run(pred.predict_many(["known", "unknown", "kk"]))
    assert [o.source for o in out] == ["fake", "heuristic", "fake"]
    assert out[1] == heuristic_prediction("unknown", "lookup_miss")
    assert pred._fallbacks.counts == {"lookup_miss": 1.0}


def test_a_failing_backend_falls_back_for_the_whole_batch():
    pred = _deployment(_Backend())
    out = asyncio.run(pred.predict_many(["known", "boom"]))
    assert [(o.source, o.fallback_reason) for o in out] == [("heuristic", "error")] * 2
    assert pred._fallbacks.counts == {"error": 2.0}
