"""Grouped K-fold out-of-fold predictions: no problem is ever in both the train
and the test side of a fold (groups = problem ids; the same id in two pools is
one group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clear_core.errors import ClearError, InvalidInputError
from clear_predictor.data import LengthDataset


@dataclass
class OOFResult:
    pred_log: np.ndarray  # out-of-fold predicted log length per problem, log-tokens
    fold: np.ndarray  # test fold index per problem
    n_splits: int  # folds
    seed: int  # shuffling seed of the fold assignment


def group_kfold_splits(groups, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per fold, grouped; raises if a group would straddle a fold."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups).astype(str)
    n_groups = len(np.unique(groups))
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise InvalidInputError("folds", n_splits, "must be an integer >= 2")
    if n_groups < n_splits:
        raise InvalidInputError("folds", n_splits, f"only {n_groups} distinct problems")
    try:  # scikit-learn >= 1.6 shuffles groups itself
        splitter = GroupKFold(n_splits=int(n_splits), shuffle=True, random_state=int(seed))
        splits = [(tr, te) for tr, te in splitter.split(np.zeros(len(groups)), groups=groups)]
    except TypeError:  # older scikit-learn: shuffled groups dealt round-robin
        uniq = np.unique(groups)
        order = np.random.default_rng(int(seed)).permutation(len(uniq))
        fold_of = {uniq[j]: k % int(n_splits) for k, j in enumerate(order)}
        f = np.array([fold_of[g] for g in groups])
        splits = [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(int(n_splits))]
    tested = np.zeros(len(groups), dtype=np.int64)
    for tr, te in splits:
        if set(groups[tr]) & set(groups[te]):  # the invariant the whole evaluation rests on
            raise ClearError("grouped K-fold put a problem on both sides of a fold")
        tested[te] += 1
    if (tested != 1).any():  # a bug of the splitter, not of the caller's input
        raise ClearError(f"grouped K-fold tested {int((tested != 1).sum())} rows other than exactly once")
    return splits


def out_of_fold(
    data: LengthDataset,
    make_model: Callable[[], object],
    n_splits: int = 5,
    seed: int = 0,
    on_fold: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> OOFResult:
    """Fit a fresh ``make_model()`` on each fold's train rows; predict its test rows."""
    pred = np.full(len(data), np.nan)
    fold = np.full(len(data), -1, dtype=np.int64)
    for k, (tr, te) in enumerate(group_kfold_splits(data.groups, n_splits, seed)):
        model = make_model()
        model.fit([data.texts[i] for i in tr], data.log_targets[tr])
        got = np.asarray(model.predict_log([data.texts[i] for i in te]), dtype=float)
        if got.shape != (len(te),):
            raise InvalidInputError(
                "make_model", _name(make_model), f"its model returned {got.shape} predictions for {len(te)} prompts"
            )
        pred[te] = got
        fold[te] = k
        if on_fold is not None:
            on_fold(k, tr, te, pred[te])
    bad = ~np.isfinite(pred)
    if bad.any():  # the splits test every row once, so only the model can leave a hole
        raise InvalidInputError(
            "make_model", _name(make_model),
            f"its models predicted a non-finite log length for {int(bad.sum())} of {len(pred)} problems",
        )
    return OOFResult(pred_log=pred, fold=fold, n_splits=int(n_splits), seed=int(seed))


def _name(make_model) -> str:
    return getattr(make_model, "__name__", None) or repr(make_model)
