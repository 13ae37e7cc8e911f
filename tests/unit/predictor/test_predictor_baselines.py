"""The two cheap baselines recover synthetic relations."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.errors import InvalidInputError
from clear_predictor.baselines import PromptLengthBaseline, TfidfRidgeBaseline


def test_length_baseline_recovers_a_log_log_relation():
    rng = np.random.default_rng(0)
    n_chars = rng.integers(5, 2000, size=300)
    texts = ["a" * int(n) for n in n_chars]
    y = 2.0 + 0.7 * np.log1p(n_chars) + rng.normal(0, 0.05, size=300)
    m = PromptLengthBaseline("chars").fit(texts, y)
    assert m.slope == pytest.approx(0.7, abs=0.02)
    assert m.intercept == pytest.approx(2.0, abs=0.1)
    pred = m.predict_log(["a" * 100, ""])
    assert pred[0] == pytest.approx(2.0 + 0.7 * np.log(101), abs=0.05)
    assert np.isfinite(pred[1])


def test_length_baseline_in_words():
    texts = [" ".join(["w"] * k) for k in range(1, 60)]
    y = 1.0 + 0.5 * np.log1p(np.arange(1, 60))
    m = PromptLengthBaseline("words").fit(texts, y)
    np.testing.assert_allclose(m.predict_log(texts), y, atol=1e-9)


def test_tfidf_ridge_learns_keywords_and_ranks():
    rng = np.random.default_rng(1)
    fillers = "find the value of the number given that it is positive".split()
    texts, y = [], []
    for _ in range(200):
        hard = rng.random() < 0.5
        words = list(rng.choice(fillers, size=6)) + (["olympiad", "prove"] if hard else ["apples", "dollars"])
        texts.append(" ".join(words))
        y.append(7.0 if hard else 5.0)
    m = TfidfRidgeBaseline().fit(texts, np.array(y))
    p = m.predict_log(["prove this olympiad bound", "how many apples and dollars"])
    assert p[0] > 6.3 and p[1] < 5.7


def test_baselines_reject_bad_input():
    for cls in (PromptLengthBaseline, TfidfRidgeBaseline):
        with pytest.raises(InvalidInputError):
            cls().fit(["a", "b"], [1.0])
        with pytest.raises(InvalidInputError):
            cls().fit(["a", "b"], [1.0, np.inf])
        with pytest.raises(InvalidInputError):
            cls().predict_log(["a"])  # not fitted
    with pytest.raises(InvalidInputError):
        PromptLengthBaseline("tokens")
