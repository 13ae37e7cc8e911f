"""Grouped cross-validation: no problem is ever on both sides of a fold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.errors import ClearError, InvalidInputError
from clear_core.traces import load_pool
from clear_predictor.baselines import PromptLengthBaseline, TfidfRidgeBaseline
from clear_predictor.crossval import group_kfold_splits, out_of_fold
from clear_predictor.data import build_dataset

from predictor_helpers import write_pool


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 30), min_size=10, max_size=80),
    folds=st.integers(2, 6),
    seed=st.integers(0, 1000),
)
def test_no_group_on_both_sides(ids, folds, seed):
    groups = np.array([f"p{i}" for i in ids])
    if len(set(ids)) < folds:
        with pytest.raises(InvalidInputError):
            group_kfold_splits(groups, folds, seed)
        return
    splits = group_kfold_splits(groups, folds, seed)
    assert len(splits) == folds
    seen_test = np.zeros(len(groups), dtype=int)
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == len(groups)
        seen_test[te] += 1
    assert np.all(seen_test == 1)  # every row is tested exactly once


def test_duplicate_problem_across_pools_stays_in_one_fold(tmp_path):
    a = write_pool(tmp_path / "a.jsonl", n=25, seed=0)
    b = write_pool(tmp_path / "b.jsonl", n=25, seed=0)  # same ids, as two models' pools would have
    data = build_dataset(load_pool(a) + load_pool(b))
    assert len(data) == 50 and len(set(data.ids)) == 25
    folds = {}
    res = out_of_fold(data, TfidfRidgeBaseline, n_splits=5, seed=1)
    for pid, k in zip(data.ids, res.fold):
        folds.setdefault(pid, set()).add(int(k))
    assert all(len(v) == 1 for v in folds.values())
    assert np.all(np.isfinite(res.pred_log))


def test_out_of_fold_never_sees_its_own_rows(tmp_path):
    """A model that memorises its training texts must not recall the test rows."""

    class Memo:
        def fit(self, texts, y):
            self.seen = dict(zip(texts, y))
            return self

        def predict_log(self, texts):
            return np.array([self.seen.get(t, -1.0) for t in texts])

    data = build_dataset(load_pool(write_pool(tmp_path / "p.jsonl", n=30)))
    res = out_of_fold(data, Memo, n_splits=3, seed=0)
    assert np.all(res.pred_log == -1.0)
    assert sorted(set(res.fold.tolist())) == [0, 1, 2]


def test_folds_argument_is_checked(tmp_path):
    data = build_dataset(load_pool(write_pool(tmp_path / "p.jsonl", n=10)))
    with pytest.raises(InvalidInputError):
        out_of_fold(data, PromptLengthBaseline, n_splits=1)
    with pytest.raises(InvalidInputError):
        out_of_fold(data, PromptLengthBaseline, n_splits=11)
    with pytest.raises(InvalidInputError) as err:
        group_kfold_splits(["a", "b", "c"], 2.5)
    assert err.value.name == "folds" and err.value.value == 2.5


class _Constant:
    """A model predicting ``value`` for every prompt (``rows``: how many values it returns)."""

    def __init__(self, value=1.0, rows=None):
        self.value, self.rows = value, rows

    def fit(self, texts, y):
        return self

    def predict_log(self, texts):
        return np.full(len(texts) if self.rows is None else self.rows, self.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_model_without_a_finite_prediction_is_an_input_error(tmp_path, value):
    data = build_dataset(load_pool(write_pool(tmp_path / "p.jsonl", n=12)))
    with pytest.raises(InvalidInputError) as err:
        out_of_fold(data, lambda: _Constant(value), n_splits=3)
    assert err.value.name == "make_model" and "12 of 12" in err.value.reason
    assert not isinstance(err.value, AssertionError)


def test_a_model_returning_the_wrong_number_of_predictions_is_an_input_error(tmp_path):
    data = build_dataset(load_pool(write_pool(tmp_path / "p.jsonl", n=12)))
    with pytest.raises(InvalidInputError, match="predictions for"):
        out_of_fold(data, lambda: _Constant(rows=1), n_splits=3)


def test_a_splitter_breaking_the_grouping_is_a_clear_error_not_an_input_error(monkeypatch):
    """The invariant check is not an input check: a straddling fold is the splitter's bug."""
    import sklearn.model_selection

    class Straddling:
        def __init__(self, n_splits, **_):
            self.n_splits = n_splits

        def split(self, x, groups=None):
            rows = np.arange(len(x))
            for _ in range(self.n_splits):
                yield rows, rows  # every problem on both sides

    monkeypatch.setattr(sklearn.model_selection, "GroupKFold", Straddling)
    with pytest.raises(ClearError, match="both sides") as err:
        group_kfold_splits(["a", "b", "c", "d"], 2)
    assert not isinstance(err.value, (InvalidInputError, AssertionError))
