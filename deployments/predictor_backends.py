"""Threshold predictors the Predictor deployment can run: prompt -> (tau_hat tokens, log sigma).

``heuristic`` (the embedded default and the fallback)
    ``tau_hat = exp(4.914 + 0.159 * ln(prompt characters))`` clipped to
    [16, 8192] tokens, log-space error ``sigma = 0.84``: a least-squares fit of
    log(geometric-mean sample length) on log(prompt length) over the main pool
    (1,889 problems; sigma is the fit's residual standard deviation). It needs
    no file, so a request can always be capped, whatever happens to the real
    predictor.
``lookup``
    A predictions table, JSONL with ``{"id", "threshold_tokens", "log_sigma"}``
    per problem id (optionally ``"prompt"``); prompts are mapped to ids by the
    row's ``prompt`` or by a trace pool. Used by the digital twin and load
    tests (the same thresholds as the offline bench). A prompt not in the table
    falls back to the heuristic (counted as ``lookup_miss``).
``checkpoint``
    ``clear_predictor.inference.ThresholdPredictor.from_checkpoint`` (imported
    only when configured).
"""

from __future__ import annotations


import numpy as np

from clear_core.predictions import read_predictions

HEURISTIC_INTERCEPT = 4.914
HEURISTIC_SLOPE = 0.159
HEURISTIC_LOG_SIGMA = 0.84
MIN_THRESHOLD_TOKENS = 16.0
MAX_THRESHOLD_TOKENS = 8192.0


class HeuristicPredictor:
    """Prompt-length rule (module docstring)."""

    log_sigma = HEURISTIC_LOG_SIGMA

    def predict(self, prompts: list[str]) -> np.ndarray:
        chars = np.array([max(len(p), 1) for p in prompts], dtype=float)
        tau = np.exp(HEURISTIC_INTERCEPT + HEURISTIC_SLOPE * np.log(chars))
        return np.clip(tau, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS)


class LookupPredictor:
    """Thresholds from a predictions table; ``predict`` returns NaN for prompts it does not know."""

    def __init__(self, table_path: str, pool_path: str | None = None):
        self.by_id: dict[str, tuple[float, float]] = {}
        self.prompt_to_id: dict[str, str] = {}
        table = read_predictions(table_path)
        for row in table.rows:
            self.by_id[row.id] = (row.threshold_tokens, row.log_sigma or 0.0)
            if row.prompt is not None:
                self.prompt_to_id[row.prompt.strip()] = row.id
        sigmas = [row.log_sigma or 0.0 for row in table.rows]
        if pool_path:
            from clear_core.traces import load_pool

            for p in load_pool(pool_path):
                self.prompt_to_id.setdefault(p.problem.strip(), p.id)
        self.log_sigma = float(np.median(sigmas)) if sigmas else 0.0

    def lookup(self, prompt: str) -> tuple[float, float] | None:
        pid = self.prompt_to_id.get(prompt.strip())
        return self.by_id.get(pid) if pid is not None else None


def load_checkpoint_predictor(path: str, device: str | None = None):
    from clear_predictor.inference import ThresholdPredictor  # heavy: torch + transformers

    return ThresholdPredictor.from_checkpoint(path, device=device)
