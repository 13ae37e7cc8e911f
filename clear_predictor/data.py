"""Turn oracle pools into a regression data set: one row per problem.

A predictor only ever sees the prompt, so every sample of a problem shares one
prediction. The regression target of a problem is the **mean of log(sample
tokens)** over its samples:

* the predictor is trained with MSE on log length, and for a fixed prompt the
  constant ``c`` minimising ``sum_j (log d_j - c)^2`` over the problem's samples
  ``d_1..d_k`` is their mean log length, so this is the MSE-optimal point
  predictor of a *query's* log length (a query is one (problem, sample) pair);
* it equals ``log(d)`` for GSM8K / MATH-500 (one sample each) and is the log of
  the geometric mean of the eight samples of AMC-23 / AIME, which is robust to
  the one very long sample that dominates an arithmetic mean;
* the median (``clear_core.traces.median_tokens``) is the L1-optimal choice; it
  is kept for reference in :attr:`LengthDataset.median_tokens`.

Lengths of 0 tokens are clamped to 1 before the log. Samples that hit the
generation cap are censored (the true length is larger); they enter at the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.traces import Problem, load_pool, median_tokens


@dataclass(frozen=True)
class LengthDataset:
    """Problems of one or more pools, aligned by row."""

    ids: tuple[str, ...]  # problem id (dataset/unique id), also the CV group
    texts: tuple[str, ...]  # the prompt text
    log_targets: np.ndarray  # mean of log(sample tokens) per problem, log-tokens
    datasets: tuple[str, ...]  # gsm8k, math500, amc23 or aime
    sample_tokens: tuple[np.ndarray, ...]  # every sample's completion length, tokens
    median_tokens: np.ndarray  # median sample length per problem, tokens
    sample_correct: tuple[np.ndarray, ...] = ()  # whether each sample's answer was correct (when the pool says)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def groups(self) -> np.ndarray:
        """Group label per row for grouped cross-validation (the problem id)."""
        return np.asarray(self.ids, dtype=object)

    def subset(self, index: Sequence[int] | np.ndarray) -> "LengthDataset":
        idx = np.asarray(index, dtype=np.int64)
        return LengthDataset(
            ids=tuple(self.ids[i] for i in idx),
            texts=tuple(self.texts[i] for i in idx),
            log_targets=self.log_targets[idx].copy(),
            datasets=tuple(self.datasets[i] for i in idx),
            sample_tokens=tuple(self.sample_tokens[i] for i in idx),
            median_tokens=self.median_tokens[idx].copy(),
            sample_correct=tuple(self.sample_correct[i] for i in idx) if self.sample_correct else (),
        )


def log_target(tokens: Sequence[int] | np.ndarray) -> float:
    """Mean of log(max(tokens, 1)) over a problem's samples (log-tokens)."""
    arr = np.asarray(tokens, dtype=float)
    if arr.size == 0:
        raise InvalidInputError("tokens", list(arr), "a problem needs at least one sample")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise InvalidInputError("tokens", arr.tolist(), "sample lengths must be finite and >= 0")
    return float(np.mean(np.log(np.maximum(arr, 1.0))))


def build_dataset(problems: Sequence[Problem], limit: int | None = None) -> LengthDataset:
    """One row per problem; ``limit`` keeps the first ``limit`` problems."""
    if limit is not None:
        if not isinstance(limit, (int, np.integer)) or limit <= 0:
            raise InvalidInputError("limit", limit, "must be a positive integer")
        problems = list(problems)[: int(limit)]
    if not problems:
        raise InvalidInputError("problems", [], "no problems to build a data set from")
    toks = tuple(np.array([s.tokens for s in p.samples], dtype=np.int64) for p in problems)
    return LengthDataset(
        ids=tuple(p.id for p in problems),
        texts=tuple(p.problem for p in problems),
        log_targets=np.array([log_target(t) for t in toks], dtype=float),
        datasets=tuple(p.dataset for p in problems),
        sample_tokens=toks,
        median_tokens=np.array([median_tokens(p) for p in problems], dtype=float),
        sample_correct=tuple(np.array([bool(s.correct) for s in p.samples], dtype=bool) for p in problems),
    )


def load_dataset(paths: str | Path | Sequence[str | Path], limit: int | None = None) -> LengthDataset:
    """Read one or more pools and build the data set (``limit`` applies to the concatenation)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InvalidInputError("traces", [], "give at least one pool file")
    problems: list[Problem] = []
    for p in paths:
        if not Path(p).is_file():
            raise InvalidInputError("traces", str(p), "no such file")
        problems.extend(load_pool(p))
    return build_dataset(problems, limit=limit)


def query_arrays(data: LengthDataset, per_problem: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand per-problem values to queries: (values, true tokens, row index of the problem)."""
    per_problem = np.asarray(per_problem, dtype=float)
    if per_problem.shape != (len(data),):
        raise InvalidInputError("predictions", per_problem.shape, f"expected shape ({len(data)},)")
    counts = np.array([len(t) for t in data.sample_tokens], dtype=np.int64)
    rows = np.repeat(np.arange(len(data)), counts)
    tokens = np.concatenate(data.sample_tokens).astype(float) if len(data) else np.zeros(0)
    return per_problem[rows], tokens, rows


def safe_log_tokens(tokens: np.ndarray) -> np.ndarray:
    """log(max(tokens, 1)), the convention of :func:`log_target`."""
    return np.log(np.maximum(np.asarray(tokens, dtype=float), 1.0))


__all__ = ["LengthDataset", "build_dataset", "load_dataset", "log_target", "query_arrays", "safe_log_tokens"]
