"""Predictor deployment: batched prompt -> predicted emergence threshold tau_hat.

Prompts from concurrent requests are batched with ``@serve.batch`` (size and
wait from the config) and run through the configured backend (see
:mod:`deployments.predictor_backends`). If the backend raises, or does not know
a prompt (lookup table miss), those prompts get the heuristic's threshold and
``clear_predictor_fallbacks`` counts them (``reason=error`` or
``lookup_miss``). The ingress adds the other fallback: a predictor call that
fails or exceeds ``predictor.timeout_s`` (``reason=timeout|error``).
"""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np
from ray import serve

from deployments.config import PredictorConfig
from deployments.metrics import PREDICTOR_FALLBACKS, counter
from deployments.predictor_backends import HeuristicPredictor, LookupPredictor, load_checkpoint_predictor

logger = logging.getLogger("ray.serve")


def heuristic_prediction(prompt: str, reason: str | None = None) -> dict:
    """The documented fallback: prompt-length heuristic."""
    h = HeuristicPredictor()
    return {
        "threshold_tokens": float(h.predict([prompt])[0]),
        "log_sigma": h.log_sigma,
        "source": "heuristic",
        "fallback_reason": reason,
    }


class Predictor:
    def __init__(self, config: dict | PredictorConfig):
        self.config = PredictorConfig.model_validate(config)
        self.heuristic = HeuristicPredictor()
        self.lookup: LookupPredictor | None = None
        self.model = None
        if self.config.backend == "lookup":
            self.lookup = LookupPredictor(self.config.table_path, self.config.pool_path)
        elif self.config.backend == "checkpoint":
            self.model = load_checkpoint_predictor(self.config.checkpoint_path, self.config.device)
        self.predict_batch.set_max_batch_size(self.config.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._fallbacks = counter(PREDICTOR_FALLBACKS, "Requests capped from the fallback predictor", ("reason",))

    def _sigma(self, backend_sigma: float) -> float:
        return self.config.log_sigma if self.config.log_sigma is not None else float(backend_sigma)

    async def predict(self, prompt: str) -> dict:
        return await self.predict_batch(prompt)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, prompts: list[str]) -> list[dict]:
        return await self.predict_many(prompts)

    async def predict_many(self, prompts: list[str]) -> list[dict]:
        """One batch through the backend (unbatched entry point for tests and benchmarks)."""
        if self.config.backend == "heuristic":
            tau = self.heuristic.predict(prompts)
            sig = self._sigma(self.heuristic.log_sigma)
            return [{"threshold_tokens": float(t), "log_sigma": sig, "source": "heuristic", "fallback_reason": None} for t in tau]
        if self.config.backend == "lookup":
            out = []
            for p in prompts:
                hit = self.lookup.lookup(p)
                if hit is None:
                    self._fallbacks.inc(1.0, tags={"reason": "lookup_miss"})
                    out.append(heuristic_prediction(p, "lookup_miss"))
                else:
                    out.append(
                        {"threshold_tokens": hit[0], "log_sigma": self._sigma(hit[1]), "source": "lookup", "fallback_reason": None}
                    )
            return out
        try:
            tau = np.asarray(await asyncio.to_thread(self.model.predict, list(prompts)), dtype=float)
            if tau.shape != (len(prompts),) or not np.all(np.isfinite(tau)):
                raise ValueError(f"predictor returned shape {tau.shape} or non-finite thresholds")
            sig = self._sigma(getattr(self.model, "log_sigma", self.heuristic.log_sigma))
            return [
                {"threshold_tokens": max(float(t), 0.0), "log_sigma": sig, "source": "checkpoint", "fallback_reason": None}
                for t in tau
            ]
        except Exception:  # the request must still get a cap: fall back, count, log
            logger.exception("predictor backend failed; using the heuristic for %d prompts", len(prompts))
            self._fallbacks.inc(float(len(prompts)), tags={"reason": "error"})
            return [heuristic_prediction(p, "error") for p in prompts]

    def check_health(self) -> None:
        if self.config.backend == "checkpoint" and self.model is None:
            raise RuntimeError("predictor checkpoint not loaded")


def valid_prediction(pred: dict) -> bool:
    t, s = pred.get("threshold_tokens"), pred.get("log_sigma")
    return isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 and isinstance(s, (int, float)) and s >= 0
