"""Cheap baselines with the regressor's interface: ``fit(texts, y)`` / ``predict_log(texts)``.

``y`` is the log length (log-tokens) per text, as built by :mod:`clear_predictor.data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clear_core.errors import InvalidInputError


def _check_fit(texts: Sequence[str], y) -> np.ndarray:
    if isinstance(texts, str):
        raise InvalidInputError("texts", texts[:40], "expected a list of strings")
    y = np.asarray(y, dtype=float)
    if y.shape != (len(texts),) or len(texts) == 0:
        raise InvalidInputError("y", y.shape, f"need one target per text ({len(texts)} texts)")
    if not np.all(np.isfinite(y)):
        raise InvalidInputError("y", "non-finite", "targets must be finite")
    return y


class PromptLengthBaseline:
    """log length ~ a + b * log(1 + prompt length), length in characters or words."""

    name = "length"

    def __init__(self, unit: str = "chars"):
        if unit not in ("chars", "words"):
            raise InvalidInputError("unit", unit, "expected 'chars' or 'words'")
        self.unit = unit
        self.intercept: float | None = None  # log-tokens
        self.slope: float | None = None  # log-tokens per log(prompt units)

    def _x(self, texts: Sequence[str]) -> np.ndarray:
        if self.unit == "chars":
            n = [len(t) for t in texts]
        else:
            n = [len(t.split()) for t in texts]
        return np.log1p(np.asarray(n, dtype=float))

    def fit(self, texts: Sequence[str], y) -> "PromptLengthBaseline":
        y = _check_fit(texts, y)
        x = self._x(texts)
        if np.ptp(x) == 0:
            self.slope, self.intercept = 0.0, float(y.mean())
        else:
            self.slope, self.intercept = (float(v) for v in np.polyfit(x, y, 1))
        return self

    def predict_log(self, texts: Sequence[str]) -> np.ndarray:
        if self.slope is None:
            raise InvalidInputError("model", None, "call fit() first")
        return self.intercept + self.slope * self._x(texts)


class TfidfRidgeBaseline:
    """TF-IDF of word uni+bigrams (sublinear tf, min_df 2) -> Ridge (alpha 1)."""

    name = "tfidf"

    def __init__(self, alpha: float = 1.0, ngram_range: tuple[int, int] = (1, 2), min_df: int = 2):
        if not alpha > 0:
            raise InvalidInputError("alpha", alpha, "must be > 0")
        self.alpha = float(alpha)
        self.ngram_range = tuple(ngram_range)
        self.min_df = int(min_df)
        self.pipeline = None

    def fit(self, texts: Sequence[str], y) -> "TfidfRidgeBaseline":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline

        y = _check_fit(texts, y)
        min_df = self.min_df if len(texts) >= 10 * self.min_df else 1
        self.pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=self.ngram_range, min_df=min_df, sublinear_tf=True),
            Ridge(alpha=self.alpha),
        )
        try:
            self.pipeline.fit(list(texts), y)
        except ValueError as exc:  # e.g. an empty vocabulary
            raise InvalidInputError("texts", f"{len(texts)} texts", f"TF-IDF cannot be fitted: {exc}") from exc
        return self

    def predict_log(self, texts: Sequence[str]) -> np.ndarray:
        if self.pipeline is None:
            raise InvalidInputError("model", None, "call fit() first")
        return np.asarray(self.pipeline.predict(list(texts)), dtype=float)


BASELINES = {"length": PromptLengthBaseline, "tfidf": TfidfRidgeBaseline}
