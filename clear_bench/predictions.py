"""Where a bench run gets its thresholds: ``oracle``, ``oracle-noise:SIGMA`` or a file.

A predictions file is JSONL, one line per problem:
``{"id": PROBLEM_ID, "threshold_tokens": FLOAT[, "log_sigma": FLOAT]}``
(the predictor's ``crossval`` and ``predict`` commands write it). Every query
of a problem gets the problem's prediction; ``log_sigma`` is the predictor's
error in log space, which the uncertainty-aware ``clear`` policy prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.predictions import read_predictions
from clear_core.traces import Stream, log_noise

#: Seed offset so prediction noise is independent of the stream draw.
NOISE_SEED_OFFSET = 10_007


@dataclass(frozen=True)
class Predictions:
    spec: str  # as given on the command line
    kind: str  # "oracle", "oracle-noise" or "file"
    sigma: float  # log-space error of the thresholds (0 for oracle)
    table: dict[str, float] | None = None  # problem id -> threshold (file only)

    def thresholds(self, stream: Stream) -> np.ndarray:
        """Predicted thresholds for every query of ``stream``."""
        if self.kind == "oracle":
            return stream.tokens.astype(float)
        if self.kind == "oracle-noise":
            return log_noise(stream.tokens, self.sigma, stream.seed + NOISE_SEED_OFFSET)
        assert self.table is not None
        missing = [pid for pid in stream.problem_ids if pid not in self.table]
        if missing:
            raise InvalidInputError(
                "predictions", self.spec, f"no prediction for {len(missing)} problems, e.g. {missing[0]!r}"
            )
        return np.array([self.table[pid] for pid in stream.problem_ids], dtype=float)


def parse_predictions(spec: str, log_sigma: float | None = None) -> Predictions:
    """Parse ``oracle``, ``oracle-noise:SIGMA`` or a path to a predictions JSONL."""
    if spec == "oracle":
        return Predictions(spec, "oracle", 0.0)
    if spec.startswith("oracle-noise:"):
        try:
            sigma = float(spec.split(":", 1)[1])
        except ValueError:
            raise InvalidInputError("predictions", spec, "expected oracle-noise:SIGMA with a number") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise InvalidInputError("predictions", spec, "SIGMA must be finite and >= 0")
        return Predictions(spec, "oracle-noise", sigma if log_sigma is None else log_sigma)
    if not Path(spec).is_file():
        raise InvalidInputError("predictions", spec, "not oracle, oracle-noise:SIGMA or an existing file")
    table = read_predictions(spec)
    if log_sigma is None:
        log_sigma = float(np.median(table.log_sigmas)) if table.log_sigmas else 0.0
    return Predictions(spec, "file", log_sigma, table.thresholds)
