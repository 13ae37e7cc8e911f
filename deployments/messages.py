"""Typed messages between the deployments (frozen dataclasses, pickled over Serve handles).

Ingress -> Predictor -> Ingress: :class:`Prediction`.
Ingress -> Allocator -> Ingress: :class:`clear_core.online_market.Decision`.
Ingress -> replay engine: :class:`deployments.engines.base.EngineRequest` (and ``EngineChunk`` back);
Ingress -> vLLM: the client's own request, as vLLM's request model (:mod:`deployments.vllm_protocol`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clear_core.online_market import Decision, DecisionReason


@dataclass(frozen=True)
class Prediction:
    """A predicted emergence threshold for one prompt."""

    threshold_tokens: float  # tau_hat, the reasoning tokens the request is predicted to need
    log_sigma: float  # the spread of log length around it: a global out-of-fold RMSE, or this request's calibrated one
    source: str  # the backend that made it: minilm-ridge, heuristic, lookup or checkpoint
    fallback_reason: str | None = None  # why the fallback was used (timeout, error, lookup_miss), else None
    # Probability that the request never finishes within the recording's cap (a runaway generation,
    # which spends its whole cap), from a calibrated backend (minilm-ridge); 0.0 from the others.
    runaway: float = 0.0
    # The backend's prediction before calibration (minilm-ridge; None: ``threshold_tokens`` is it). The
    # calibration's length histograms (clear-cost-emp) are relative to it, and it names the request's bin.
    raw_threshold_tokens: float | None = None
    # The encoder's features the prediction was made from (minilm-ridge, while the service learns: the
    # length learner refits the head on them), float32; and the length model's version (0: as shipped).
    features: object = None
    model_version: int = 0

    def __post_init__(self):
        if not (isinstance(self.threshold_tokens, (int, float)) and math.isfinite(self.threshold_tokens)
                and self.threshold_tokens >= 0):
            raise ValueError(f"threshold_tokens must be finite and >= 0, got {self.threshold_tokens!r}")
        if not (isinstance(self.log_sigma, (int, float)) and math.isfinite(self.log_sigma) and self.log_sigma >= 0):
            raise ValueError(f"log_sigma must be finite and >= 0, got {self.log_sigma!r}")
        # 1 would mean a request that can never finish: no cap buys it anything.
        if not (isinstance(self.runaway, (int, float)) and 0.0 <= self.runaway < 1.0):
            raise ValueError(f"runaway must be in [0, 1), got {self.runaway!r}")
        raw = self.raw_threshold_tokens
        if raw is not None and not (isinstance(raw, (int, float)) and math.isfinite(raw) and raw >= 0):
            raise ValueError(f"raw_threshold_tokens must be finite and >= 0, got {raw!r}")

    @property
    def priced_threshold_tokens(self) -> float:
        """The threshold a length-histogram market prices: the raw prediction when the backend gave one."""
        return float(self.threshold_tokens if self.raw_threshold_tokens is None else self.raw_threshold_tokens)


__all__ = ["Decision", "DecisionReason", "Prediction"]
