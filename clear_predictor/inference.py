"""Serving-side predictor: load a checkpoint once, predict thresholds in tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clear_core.errors import InvalidInputError
from clear_predictor.batching import bucketed_batches, collate, pad_token_id, tokenize
from clear_predictor.config import DEFAULT_EVAL_BATCH_SIZE
from clear_predictor.model import LengthRegressor, TrainingMetadata, load_checkpoint, pick_device

#: Padded tokens per forward pass at inference (rows * longest row): batches of
#: long prompts are cut smaller, so a large batch size never builds a huge
#: attention tensor (128 prompts of 512 tokens would take ~1.6 GB in MiniLM).
MAX_BATCH_TOKENS = 8192

#: Predictions are clipped to [exp(MIN_LOG), exp(MAX_LOG)] tokens: 1 to ~1M.
MIN_LOG = 0.0
MAX_LOG = float(np.log(2.0**20))


@torch.inference_mode()
def predict_log_batched(
    model: LengthRegressor,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    device: torch.device | str = "cpu",
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
) -> np.ndarray:
    """Predicted log length per text (log-tokens), in input order; batches sorted by length,
    at most ``batch_size`` prompts and (unless one prompt alone exceeds it) ``max_batch_tokens``
    padded tokens."""
    ids = tokenize(tokenizer, texts, max_length)
    out = np.empty(len(ids), dtype=float)
    if not ids:
        return out
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer)
    for idx in bucketed_batches([len(r) for r in ids], batch_size, max_batch_tokens=max_batch_tokens):
        batch = collate([ids[i] for i in idx], pad, device)
        out[idx] = model(**batch).float().cpu().numpy()
    if was_training:
        model.train()
    return out


def finite_log(pred: np.ndarray, fallback: float) -> np.ndarray:
    """Replace non-finite values by ``fallback`` and clip to [MIN_LOG, MAX_LOG]."""
    pred = np.asarray(pred, dtype=float)
    pred = np.where(np.isfinite(pred), pred, fallback)
    return np.clip(pred, MIN_LOG, MAX_LOG)


class ThresholdPredictor:
    """``predict(prompts) -> thresholds`` (tokens): ``exp`` of the predicted log length.

    Load it once per process (``from_checkpoint``); it is stateless afterwards.
    ``log_sigma`` is the RMS residual of log(query length) measured at training
    time (validation split), for callers that model uncertainty (log-normal).
    """

    def __init__(self, model: LengthRegressor, tokenizer, metadata: TrainingMetadata, device=None, batch_size: int = DEFAULT_EVAL_BATCH_SIZE):
        if batch_size <= 0:
            raise InvalidInputError("batch_size", batch_size, "must be a positive integer")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.batch_size = int(batch_size)
        self.max_length = int(model.config.max_length)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> "ThresholdPredictor":
        dev = pick_device(device)
        model, tokenizer, meta = load_checkpoint(path, dev)
        return cls(model, tokenizer, meta, dev, batch_size)

    @property
    def log_sigma(self) -> float:
        """RMS residual of log length (log-tokens) from the checkpoint's metadata."""
        return float(self.metadata.log_sigma)

    def predict_log(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted log length (log-tokens), finite and clipped to [0, log 2^20]."""
        raw = predict_log_batched(self.model, self.tokenizer, prompts, self.max_length, self.batch_size, self.device)
        return finite_log(raw, float(self.model.config.target_mean))

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        """Thresholds in tokens, one per prompt: positive and finite (float64)."""
        return np.exp(self.predict_log(prompts))
