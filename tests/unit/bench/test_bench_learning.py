"""Serving while learning (clear_bench.learning) on synthetic traffic a prior head mispredicts."""

from __future__ import annotations

import numpy as np
import pytest

from clear_bench.learning import LengthModel, TrafficLearner, serve_learning
from clear_core.calibration import fit_calibration
from clear_core.policies import get_policy
from clear_core.simulate import solved_mask


def world(seed=0, n=1500, k=4):
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


@pytest.mark.parametrize("policy", ["clear", "clear-cost", "clear-cost-emp"])
def test_the_refitted_model_serves_the_traffic_better_than_the_prior_and_the_books_close(policy):
    x, tokens, correct, prior = world()
    warm, test = slice(0, 1000), slice(1000, 1500)
    solved = {}
    for learn in (False, True):
        learner = TrafficLearner(prior, x, alpha=10.0, refit_every=50, learn=learn)
        if learn:
            serve_learning(get_policy(policy), learner, tokens[warm], 150, context_limit_tokens=8192)
        caps = serve_learning(get_policy(policy), learner, tokens[test], 150, context_limit_tokens=8192,
                              rows=np.arange(1000, 1500))  # serve_learning asserts the books close
        solved[learn] = solved_mask(caps, tokens[test], correct[test]).mean()
        if learn:
            assert learner.refits == len(learner.seen) // 50 > 15  # abandoned queries are not observed
            assert abs(learner.model.intercept - 5.0) < 0.15  # the truth, not the prior
    assert solved[True] > solved[False] + 0.05, solved


def test_without_learning_the_model_never_changes_and_abandoned_queries_are_never_observed():
    x, tokens, _, prior = world(seed=1, n=400)
    learner = TrafficLearner(prior, x, alpha=10.0, refit_every=10, learn=False)
    caps = serve_learning(get_policy("clear"), learner, tokens, 60, context_limit_tokens=8192)
    assert learner.model is prior and learner.refits == 0
    assert len(learner.seen) == int((caps > 0).sum()) < len(tokens)
