"""Predictor deployment: batched prompt -> predicted emergence threshold tau_hat.

Prompts from concurrent requests are batched (:class:`~deployments.waiting_batch.WaitingBatches`: the
prompts that arrive while a batch runs form the next one; size and wait from the config) and run through
the configured
:class:`~deployments.predictor_backends.PredictorBackend`. If the backend
raises, or has no prediction for a prompt (lookup table miss), those prompts
get the heuristic's threshold and ``clear_predictor_fallbacks`` counts them
(``reason=error`` or ``lookup_miss``). The ingress adds the other fallback: a
predictor call that fails or exceeds ``predictor.advanced.timeout_s``
(``reason=timeout|error``).

While the service learns (``learner.enabled``, the minilm-ridge backend),
each prediction carries the encoder's features and the length model's
version, and the replica follows the learner's published models
(:class:`deployments.learner_client.ModelFollower`).
"""

from __future__ import annotations

import asyncio
import logging

from deployments.config import PredictorConfig
from deployments.messages import Prediction
from deployments.metrics import PREDICTOR_FALLBACKS, counter
from deployments.learner_client import ModelFollower
from deployments.predictor_backends import heuristic_prediction, make_backend
from deployments.waiting_batch import WaitingBatches

logger = logging.getLogger("ray.serve")


class Predictor:
    def __init__(self, config: PredictorConfig, learner=None, poll_s: float = 5.0):
        """``learner``: the length learner's handle (None: the model never changes), polled every ``poll_s``."""
        self.config = config
        self.backend = make_backend(config, share_features=learner is not None)
        self.batches = WaitingBatches(self.predict_many, config.advanced.max_batch_size,
                                      config.advanced.batch_wait_timeout_s)
        self._fallbacks = counter(PREDICTOR_FALLBACKS, "Requests capped from the fallback predictor", ("reason",))
        self.follower = None
        if learner is not None and hasattr(self.backend, "swap"):
            self.follower = ModelFollower(learner, poll_s, self.backend.swap)
            try:
                self.follower.start()
            except RuntimeError:  # built outside an event loop (the ingress's own predictor): started on first use
                pass

    async def predict(self, prompt: str) -> Prediction:
        """One prompt's prediction, computed with the prompts waiting beside it."""
        return await self.batches(prompt)

    async def predict_many(self, prompts: list[str]) -> list[Prediction]:
        """One batch through the backend (unbatched entry point for tests and benchmarks)."""
        if self.follower is not None:
            self.follower.start()
        try:
            if self.backend.blocking:
                preds = await asyncio.to_thread(self.backend.predict, list(prompts), self.config.advanced.log_sigma)
            else:
                preds = self.backend.predict(list(prompts), self.config.advanced.log_sigma)
        except Exception:  # the request must still get a cap: fall back, count, log
            logger.exception("predictor backend failed; using the heuristic for %d prompts", len(prompts))
            self._fallbacks.inc(float(len(prompts)), tags={"reason": "error"})
            return [heuristic_prediction(p, "error") for p in prompts]
        out = []
        for prompt, pred in zip(prompts, preds):
            if pred is None:
                self._fallbacks.inc(1.0, tags={"reason": "lookup_miss"})
                pred = heuristic_prediction(prompt, "lookup_miss")
            out.append(pred)
        return out

    def __del__(self):
        if getattr(self, "follower", None) is not None:
            self.follower.stop()
