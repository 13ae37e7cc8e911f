"""Targets and metrics: per query against true lengths, per problem against targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clear_core.errors import InvalidInputError
from clear_core.traces import Problem, Sample
from clear_predictor.data import build_dataset, log_target, query_arrays
from clear_predictor.metrics import evaluate, format_table, score


def _problem(pid, ds, toks):
    return Problem(id=pid, dataset=ds, level=2 if ds == "math500" else None, problem=f"q {pid}", answer="1",
                   samples=tuple(Sample(tokens=t, correct=True, truncated=False) for t in toks))


def test_target_is_mean_log_and_minimises_query_mse():
    toks = [100, 400, 1600, 8192, 0]
    c = log_target(toks)
    assert c == pytest.approx(np.mean(np.log([100, 400, 1600, 8192, 1])))
    logs = np.log(np.maximum(toks, 1))
    mse = lambda v: np.mean((logs - v) ** 2)  # noqa: E731
    assert mse(c) <= min(mse(c + 0.01), mse(c - 0.01), mse(np.log(np.median(np.maximum(toks, 1)))))
    with pytest.raises(InvalidInputError):
        log_target([])


def test_perfect_predictions_score_perfectly():
    probs = [_problem(f"gsm8k/{i}", "gsm8k", [50 + 10 * i]) for i in range(10)]
    probs += [_problem(f"aime/{i}", "aime", [1000 * (i + 1), 3000 * (i + 1)]) for i in range(4)]
    data = build_dataset(probs)
    m = evaluate(data, data.log_targets)
    assert m["per_problem"]["overall"]["rmse_log"] == pytest.approx(0.0, abs=1e-12)
    assert m["per_problem"]["overall"]["spearman"] == pytest.approx(1.0)
    assert m["per_query"]["overall"]["n"] == 10 + 8
    assert m["per_query"]["gsm8k"]["spearman"] == pytest.approx(1.0)
    # per query, the within-problem spread of the AIME samples is irreducible: log(3)/2
    assert m["per_query"]["aime"]["rmse_log"] == pytest.approx(math.log(3) / 2)
    assert list(m["per_query"]) == ["overall", "gsm8k", "aime"]
    table = format_table(m, "t")
    assert "| gsm8k | 10 |" in table and "per query" in table


def test_query_expansion_and_shape_check():
    data = build_dataset([_problem("a/1", "gsm8k", [10]), _problem("b/1", "amc23", [5, 6, 7])])
    vals, toks, rows = query_arrays(data, np.array([1.0, 2.0]))
    assert vals.tolist() == [1.0, 2.0, 2.0, 2.0] and toks.tolist() == [10, 5, 6, 7] and rows.tolist() == [0, 1, 1, 1]
    with pytest.raises(InvalidInputError):
        query_arrays(data, np.array([1.0]))


def test_score_edge_cases():
    s = score([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])  # constant prediction: ranks undefined
    assert math.isnan(s.spearman) and s.to_json()["spearman"] is None
    assert score([], []).n == 0
    s = score([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    assert s.spearman == pytest.approx(-1.0) and s.kendall == pytest.approx(-1.0)
    with pytest.raises(InvalidInputError):
        score([1.0], [1.0, 2.0])
