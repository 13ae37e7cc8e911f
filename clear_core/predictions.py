"""The predictions file every layer exchanges: one JSONL row per problem.

``{"id": PROBLEM_ID, "threshold_tokens": FLOAT[, "log_sigma": FLOAT][, "prompt": TEXT]}``

Written by the predictor (``predict``, ``crossval``); read by the offline
bench, the predictor's ``evaluate``, the serving lookup predictor and the
allocator's pricing-window seed. One reader, so they all refuse the same bad
rows with the same message (the file and line).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from clear_core.errors import InvalidInputError


@dataclass(frozen=True)
class PredictionRow:
    id: str  # problem id, as in the trace pools
    threshold_tokens: float  # predicted emergence threshold, tokens (>= 0)
    log_sigma: float | None  # the predictor's log-space error, when the row has it
    prompt: str | None = None  # the prompt text, when the row has it


@dataclass(frozen=True)
class PredictionTable:
    rows: list[PredictionRow] = field(default_factory=list)  # in file order

    @property
    def thresholds(self) -> dict[str, float]:
        return {r.id: r.threshold_tokens for r in self.rows}

    @property
    def log_sigmas(self) -> list[float]:
        return [r.log_sigma for r in self.rows if r.log_sigma is not None]


def read_predictions(path: str | Path) -> PredictionTable:
    """Read a predictions JSONL; raise :class:`InvalidInputError` naming the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError("predictions", str(path), "no such file")
    rows: list[PredictionRow] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                tau = float(obj["threshold_tokens"])
                sigma = None if obj.get("log_sigma") is None else float(obj["log_sigma"])
                row = PredictionRow(str(obj["id"]), tau, sigma, None if "prompt" not in obj else str(obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(where, line.strip()[:80], f"bad prediction row: {exc}") from None
            if not (math.isfinite(tau) and tau >= 0):
                raise InvalidInputError(f"{where} threshold_tokens", tau, "must be finite and >= 0")
            if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
                raise InvalidInputError(f"{where} log_sigma", sigma, "must be finite and >= 0")
            rows.append(row)
    return PredictionTable(rows)
