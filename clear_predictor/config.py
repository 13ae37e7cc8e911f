"""Training defaults and :class:`TrainConfig`, the one place they are set.

Torch-free on purpose: the ``predictor`` command line builds its options (and
their defaults) from :class:`TrainConfig` without importing torch, so
``clear-llm --help`` stays fast. :mod:`clear_predictor.train` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clear_core.errors import InvalidInputError

#: Tokens kept per prompt (the last ones: left truncation).
DEFAULT_MAX_LENGTH = 512
#: Prompts per forward pass when predicting (training's evaluation and serving).
DEFAULT_EVAL_BATCH_SIZE = 64


@dataclass
class TrainConfig:
    backbone: str | None = None  # HF name or local folder; None: bundled all-MiniLM-L6-v2
    epochs: int = 10  # passes over the training problems (paper: 10)
    batch_size: int = 32  # problems per optimiser step
    lr: float = 2e-5  # encoder learning rate (AdamW)
    head_lr: float = 1e-4  # head learning rate (AdamW)
    head_init: str = "ridge"  # "ridge": linear probe on frozen features first (LP-FT); "random"
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases / LayerNorm)
    warmup_fraction: float = 0.06  # share of steps with linear warm-up
    grad_clip: float = 1.0  # max global gradient norm
    max_length: int = DEFAULT_MAX_LENGTH  # tokens kept per prompt (the last ones)
    seed: int = 0  # seeds python, numpy and torch
    val_fraction: float = 0.0  # share of problems held out (grouped by problem id) for log_sigma
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE  # prompts per forward pass when predicting
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(name, v, "must be a positive integer")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InvalidInputError(name, v, "must be finite and > 0")
        if self.head_init not in ("ridge", "random"):
            raise InvalidInputError("head_init", self.head_init, "expected 'ridge' or 'random'")
        if not (0 <= self.weight_decay < 1):
            raise InvalidInputError("weight_decay", self.weight_decay, "must be in [0, 1)")
        if not (0 <= self.val_fraction < 1):
            raise InvalidInputError("val_fraction", self.val_fraction, "must be in [0, 1)")
        if not (0 <= self.warmup_fraction < 1):
            raise InvalidInputError("warmup_fraction", self.warmup_fraction, "must be in [0, 1)")
