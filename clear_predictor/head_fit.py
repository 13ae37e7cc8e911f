"""Fit the ridge head of :mod:`clear_predictor.head` from a pool's frozen features.

1. Out of fold: the problems are split by :func:`clear_predictor.crossval.group_kfold_splits`
   (the grouping of ``predictor crossval``); on each fold's training side a
   ridge (penalty by leave-one-out GCV over :data:`RIDGE_ALPHAS`, i.e. nested in
   the fold) regresses the mean log length; its test side is predicted.
2. Those out-of-fold predictions give the reported metrics and the calibration
   (one pair per sample: its problem's prediction, its observed tokens), so the
   calibration describes the errors of a head on prompts it never saw.
3. The shipped coefficients are refitted on every problem.

Everything here is numpy + scikit-learn on features; encoding the prompts is
the caller's (:class:`clear_predictor.features.FrozenEncoder`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clear_core.calibration import (
    DEFAULT_BINS,
    DEFAULT_SHRINK,
    fit_calibration,
    quantile_coverage,
    quantile_coverage_error,
)
from clear_core.empirical_market import SMOOTHING_LOG
from clear_core.errors import InvalidInputError
from clear_core.traces import POOL_GENERATION_CAP_TOKENS
from clear_predictor.baselines import PromptLengthBaseline
from clear_predictor.crossval import OOFResult, group_kfold_splits
from clear_predictor.data import LengthDataset, query_arrays
from clear_predictor.head import HEAD_FORMAT, RidgeHead
from clear_predictor.metrics import evaluate

#: Ridge penalties tried (the grid of the linear probe in ``train.py``).
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 4, 15))
#: A fixed prompt whose prediction the head file stores, so a loader can tell a different encoder.
PROBE_TEXT = "Find the remainder when 2^100 is divided by 7. Show your reasoning step by step."
TARGET = "mean of log(max(sample tokens, 1)) over a problem's samples (clear_predictor/data.py), log-tokens"


@dataclass
class HeadFit:
    head: RidgeHead  # refitted on every problem, with the out-of-fold calibration
    oof: OOFResult  # out-of-fold predicted log length per problem
    fold_alphas: list[float]  # the penalty each fold chose
    metrics: dict  # out-of-fold metrics (clear_predictor.metrics.evaluate) and calibration coverage


def fit_ridge(features: np.ndarray, y: np.ndarray, alphas=RIDGE_ALPHAS) -> tuple[np.ndarray, float, float]:
    """(coef, intercept, alpha) of a ridge with the penalty chosen by leave-one-out GCV."""
    from sklearn.linear_model import RidgeCV

    x, y = np.asarray(features, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise InvalidInputError("features", x.shape, f"need (n >= 2, hidden) rows for {y.shape[0]} targets")
    ridge = RidgeCV(alphas=np.asarray(alphas)).fit(x, y)
    return np.asarray(ridge.coef_, dtype=float), float(ridge.intercept_), float(ridge.alpha_)


def out_of_fold_ridge(data: LengthDataset, features: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[OOFResult, list[float]]:
    """Out-of-fold predicted log length per problem, and each fold's chosen penalty."""
    pred = np.full(len(data), np.nan)
    fold = np.full(len(data), -1, dtype=np.int64)
    alphas = []
    for k, (tr, te) in enumerate(group_kfold_splits(data.groups, folds, seed)):
        coef, intercept, alpha = fit_ridge(features[tr], data.log_targets[tr])
        pred[te] = features[te] @ coef + intercept
        fold[te] = k
        alphas.append(alpha)
    return OOFResult(pred_log=pred, fold=fold, n_splits=int(folds), seed=int(seed)), alphas


def query_pairs(data: LengthDataset, pred_log: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted tokens, observed tokens, problem row) per query: one pair per sample."""
    pq, tokens, rows = query_arrays(data, pred_log)
    return np.exp(pq), tokens, rows


def calibration_coverage(data: LengthDataset, oof: OOFResult, bins: int, censor_tokens: float) -> dict:
    """How well the binned calibration's quantiles hold, cross-fitted by the same folds (each fold's
    queries calibrated on the other folds' residuals), against one global spread (the out-of-fold
    RMSE, no bias correction): mean |observed - nominal| over the 0.1..0.9 quantile caps."""
    pred, tokens, rows = query_pairs(data, oof.pred_log)
    qfold = oof.fold[rows]
    med, sig, run = np.empty_like(pred), np.empty_like(pred), np.empty_like(pred)
    for k in range(oof.n_splits):
        cal = fit_calibration(pred[qfold != k], tokens[qfold != k], bins=bins, censor_tokens=censor_tokens)
        med[qfold == k], sig[qfold == k], run[qfold == k] = cal.apply(pred[qfold == k])
    rmse = float(np.sqrt(np.mean((np.log(pred) - np.log(np.maximum(tokens, 1.0))) ** 2)))
    binned = quantile_coverage(tokens, med, sig, run, censor_tokens=censor_tokens)
    global_ = quantile_coverage(tokens, pred, rmse, censor_tokens=censor_tokens)
    return {
        "binned_cross_fitted": {"mean_abs_error": quantile_coverage_error(binned), "levels": binned},
        "global_sigma": {"sigma": rmse, "mean_abs_error": quantile_coverage_error(global_), "levels": global_},
    }


def fit_head(
    data: LengthDataset,
    features: np.ndarray,
    encoder: dict,
    probe_features: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
    censor_tokens: float = float(POOL_GENERATION_CAP_TOKENS),
) -> HeadFit:
    """Out-of-fold metrics and calibration, then the head refitted on every problem (module docstring)."""
    features = np.asarray(features, dtype=float)
    if features.shape[0] != len(data) or features.ndim != 2:
        raise InvalidInputError("features", features.shape, f"need one row per problem ({len(data)})")
    oof, fold_alphas = out_of_fold_ridge(data, features, folds, seed)
    metrics = {"out_of_fold": evaluate(data, oof.pred_log)}
    # The prompt-length baseline on the same folds, for the record beside the head's numbers.
    length = np.full(len(data), np.nan)
    for tr, te in group_kfold_splits(data.groups, folds, seed):
        b = PromptLengthBaseline().fit([data.texts[i] for i in tr], data.log_targets[tr])
        length[te] = b.predict_log([data.texts[i] for i in te])
    metrics["out_of_fold_prompt_length"] = evaluate(data, length)
    metrics["calibration_coverage"] = calibration_coverage(data, oof, bins, censor_tokens)
    pred, tokens, rows = query_pairs(data, oof.pred_log)
    # With each sample's correctness the calibration also carries every bin's length histogram
    # (clear-cost-emp), shrunk towards the population's with each problem counted once.
    correct = np.concatenate(data.sample_correct) if data.sample_correct else None
    cal = fit_calibration(pred, tokens, bins=bins, censor_tokens=censor_tokens, correct=correct,
                          shrink=DEFAULT_SHRINK, clusters=rows)
    coef, intercept, alpha = fit_ridge(features, data.log_targets)
    probe = {"text": PROBE_TEXT, "pred_log": float(np.asarray(probe_features, dtype=float).reshape(-1) @ coef + intercept)}
    document = {
        "format": HEAD_FORMAT,
        "target": TARGET,
        "calibration": {"bins": int(bins), "censor_tokens": float(censor_tokens), "shrink": float(DEFAULT_SHRINK),
                        "smoothing": float(SMOOTHING_LOG),
                        "fitted_on": "out-of-fold predictions, one (prediction, observed tokens) pair per sample"},
        "training": {"n_problems": len(data), "n_queries": int(sum(len(t) for t in data.sample_tokens)),
                     "folds": int(folds), "seed": int(seed), "fold_grouping": "problem id (predictor crossval)",
                     "alphas_tried": list(RIDGE_ALPHAS), "fold_alphas": fold_alphas},
        "metrics": metrics,
    }
    head = RidgeHead(coef, intercept, alpha, int(encoder["max_length"]), cal, dict(encoder), probe, document)
    return HeadFit(head, oof, fold_alphas, metrics)


def transfer_metrics(train: LengthDataset, oof: OOFResult, head: RidgeHead, other: LengthDataset,
                     other_features: np.ndarray) -> dict:
    """Quality on another model's lengths: the out-of-fold predictions (prompts unseen in training)
    on the problems both pools share, and the refitted head on every problem of ``other``."""
    by_id = dict(zip(train.ids, oof.pred_log))
    rows = [i for i, pid in enumerate(other.ids) if pid in by_id]
    out = {"problems": len(other), "shared_problems": len(rows)}
    if rows:
        sub = other.subset(rows)
        out["out_of_fold"] = evaluate(sub, np.array([by_id[pid] for pid in sub.ids]))
    out["shipped_head"] = evaluate(other, head.predict_log(other_features))
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["HeadFit", "PROBE_TEXT", "RIDGE_ALPHAS", "calibration_coverage", "file_sha256", "fit_head", "fit_ridge",
           "out_of_fold_ridge", "query_pairs", "transfer_metrics"]
