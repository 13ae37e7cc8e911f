"""Serving while learning (clear_bench.learning) on synthetic traffic a prior head mispredicts."""

from __future__ import annotations

import numpy as np
import pytest

from clear_bench.learning import LearningInputs, warmup_curve
from clear_bench.online import StreamInputs, serve_online
from clear_core.calibration import fit_calibration
from clear_core.exploration import Exploration
from clear_core.length_model import LengthModel
from clear_core.policies import get_policy
from clear_core.simulate import solved_mask

WARM, N = 800, 1200


def world(seed=0, n=N, k=4):
    """Traffic whose log length is linear in its features; a prior head fitted elsewhere predicts e^1.2 times too
    long (the shipped head on another model's traffic), with a calibration that believes it."""
    rng = np.random.default_rng(seed)
    beta = np.array([0.5, -0.3, 0.2, 0.1])
    x = rng.normal(size=(n, k))
    tokens = np.maximum(np.round(np.exp(x @ beta + 5.0 + rng.normal(0, 0.4, n))), 1).astype(np.int64)
    correct = rng.random(n) < 0.7
    prior_raw = np.exp(x @ beta + 6.2)
    cal = fit_calibration(prior_raw, prior_raw * np.exp(rng.normal(0, 0.4, n)), bins=4, correct=correct)
    return x, tokens, correct, LengthModel(beta.copy(), 6.2, cal)


def fixed_inputs(model, x):
    median, spread, runaway, raw = model.predict(x)
    return StreamInputs(raw, float(np.median(spread)), median, spread, runaway, tuple(model.calibration.histograms),
                        model.calibration.bin_of(raw), served=True)


@pytest.mark.parametrize("policy", ["clear", "clear-cost", "clear-cost-emp"])
def test_the_refitted_model_serves_the_traffic_better_than_the_prior_and_the_books_close(policy):
    x, tokens, correct, prior = world()
    solved = {}
    for learn in (False, True):
        inputs = LearningInputs(prior, x, np.arange(len(x)), alpha=10.0, refit_every=50) if learn else fixed_inputs(prior, x)
        caps = serve_online(get_policy(policy), inputs, tokens, 150, context_limit_tokens=8192, block_queries=400,
                            learn_until=WARM if learn else 0)  # serve_online asserts the books close
        solved[learn] = solved_mask(caps[WARM:], tokens[WARM:], correct[WARM:]).mean()
        if learn:
            admitted_in_warmup = int((caps[:WARM] > 0).sum())
            assert len(inputs.seen) == admitted_in_warmup  # abandoned queries are not observed, scored ones neither
            # a refit every 50 observations; a version for each candidate that passed the held-out check
            assert inputs.model.version >= 1 and inputs.model.version <= admitted_in_warmup // 50
            assert abs(inputs.model.intercept - 5.0) < 0.15  # the truth, not the prior
    assert solved[True] > solved[False] + 0.05, solved


def test_the_told_values_are_the_models_prediction_as_served():
    x, _, _, prior = world(n=50)
    inputs = LearningInputs(prior, x, np.arange(len(x)), alpha=10.0)
    median, spread, runaway, raw = prior.predict(x)
    for i in (0, 17, 49):
        r, m, s, rho, b = inputs.at(i)
        assert (r, m, s, rho) == (raw[i], median[i], spread[i], runaway[i])
        assert b == int(prior.calibration.bin_of([raw[i]])[0])


def test_the_model_is_frozen_after_the_warmup():
    x, tokens, _, prior = world(seed=2, n=600)
    inputs = LearningInputs(prior, x, np.arange(len(x)), alpha=10.0, refit_every=25)
    serve_online(get_policy("clear-cost-emp"), inputs, tokens, 150, context_limit_tokens=8192, learn_until=300)
    assert all(i < 300 for i, *_ in inputs.seen)


def test_exploration_probes_insolvent_warmup_queries_within_its_token_share():
    x, tokens, _, prior = world(seed=3, n=700)
    got = {}
    for share in (0.0, 0.5):
        explored: dict = {}
        inputs = LearningInputs(prior, x, np.arange(len(x)), alpha=10.0)
        caps = serve_online(get_policy("clear-cost-emp"), inputs, tokens, 60, context_limit_tokens=8192,
                            learn_until=700, exploration=Exploration(share, 0.05), explored=explored)
        got[share] = (explored, caps)
    assert got[0.0][0]["probes"] == 0
    explored, caps = got[0.5]
    assert explored["probes"] > 0
    assert explored["probe_allocated_tokens"] <= 0.05 * explored["allocated_tokens"] + 1e-9
    assert explored["allocated_tokens"] == int(caps.sum())  # every admitted cap is counted, the probes' among them


def test_warmup_curve_scores_each_step_of_the_warmup():
    tokens = np.array([10, 20, 30, 40])
    correct = np.array([True, True, False, True])
    trace = [{"cap": c, "median": 25.0, "spread": 0.5, "runaway": 0.0} for c in (10, 10, 100, 0)]
    curve = warmup_curve(trace, tokens, correct, warmup=4, step=2)
    assert [p["arrivals"] for p in curve] == [2, 4]
    assert [p["accuracy"] for p in curve] == [50.0, 0.0]  # 10 <= 10 solved, 20 > 10 not; wrong; abandoned
    assert all(0.0 <= p["calibration_error"] <= 1.0 for p in curve)
