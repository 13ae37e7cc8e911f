"""Where a bench run gets its thresholds: ``oracle``, ``oracle-noise:SIGMA``, ``head[:PATH]`` or a file.

A predictions file is JSONL, one line per problem:
``{"id": PROBLEM_ID, "threshold_tokens": FLOAT[, "log_sigma": FLOAT]}``
(the predictor's ``crossval`` and ``predict`` commands write it). Every query
of a problem gets the problem's prediction; ``log_sigma`` is the predictor's
error in log space, which the uncertainty-aware policies price.

Calibration (``--calibration``, :mod:`clear_core.calibration`)
---------------------------------------------------------------
The paper's policies take the raw thresholds at face value (with one spread
for ``clear``), as the paper does; the policies that price each query's own
length distribution (``clear-cost``) get a calibrated one.

A prediction is not the median of the true length *given the prediction*:
a regressor shrinks towards the mean, and noise around the true length makes
the shortest predictions too short (those are the ones a market admits first,
a winner's curse). Calibration turns each raw prediction into a median and a
spread fitted out of fold: problems are split into folds by id, and each
query's raw prediction is mapped by the calibration fitted on the pool's
samples of the *other* folds' problems (for ``oracle-noise``, on the other
folds' samples with their own noise draw). ``binned`` fits bias, spread and
runaway share per bin of predicted length, ``global`` one of each, and ``none``
takes the raw predictions with one spread (the noise's SIGMA, the file's
median ``log_sigma`` or ``--log-sigma``).

``head`` (the shipped head) and ``head:PATH`` (a head file; a predictions
file literally named ``head`` is given as ``./head``) predict every problem
with the head, from the frozen encoder's features of its text
(:mod:`clear_bench.head_predictions`), and tell each policy what serving
tells it (:meth:`clear_core.length_model.LengthModel.predict`): the raw
prediction and its bin for ``clear-cost-emp``, the calibrated median, spread
and runaway share for ``clear-cost`` and the calibrated median and spread for
``clear``. By default that is the head's own calibration; ``binned`` replaces
it, for every policy, with the out-of-fold calibration of the head's raw
predictions on the pool's true lengths (the full-truth reference); ``global``
and ``none`` are refused. The paper's policies that serving does not run take
the raw predictions.

The calibration set is weighted to the composition of the stream being
served (:func:`clear_core.traces.query_weights`), as an operator calibrates on
its own recent traffic: the pool itself is mostly GSM8K, and a calibration fitted
on it says too little about a stream of mostly hard problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clear_core.calibration import DEFAULT_BINS, DEFAULT_FOLDS, DEFAULT_SHRINK, Calibration, fit_calibration, fold_of
from clear_core.empirical_market import SMOOTHING_LOG, EmpiricalLengths
from clear_core.errors import InvalidInputError
from clear_core.predictions import read_predictions
from clear_core.traces import POOL_GENERATION_CAP_TOKENS, Stream, log_noise, pool_queries, query_weights

#: Seed offset so prediction noise is independent of the stream draw.
NOISE_SEED_OFFSET = 10_007
#: Seed of the noise drawn on the pool to calibrate oracle-noise (independent of every stream's).
CALIBRATION_NOISE_SEED = 99_991
#: --calibration: how raw predictions become medians and spreads ("head": the head's own, head predictions only).
CALIBRATIONS = ("binned", "global", "none", "head")


@dataclass(frozen=True)
class Predictions:
    spec: str  # as given on the command line
    kind: str  # "oracle", "oracle-noise", "file" or "head"
    sigma: float  # log-space error of the raw thresholds (0 for oracle)
    table: dict[str, float] | None = None  # problem id -> raw threshold (file only)
    calibration: str = "none"  # CALIBRATIONS
    calibration_set: tuple | None = None  # (raw predictions, observed lengths, problem ids, problems, correct)
    folds: int = DEFAULT_FOLDS
    shrink: float = DEFAULT_SHRINK  # prior strength of the bins' length histograms (fit_calibration)
    smoothing: float = SMOOTHING_LOG  # kernel width (ln length) of the bins' length histograms (fit_calibration)
    head: object = None  # head predictions: the clear_bench.head_predictions.HeadModel
    features: dict | None = field(default=None, compare=False, repr=False)  # head: problem id -> encoder features
    _fitted: dict = field(default_factory=dict, compare=False, repr=False)  # stream name -> fold calibrations

    @property
    def as_served(self) -> bool:
        """The servable markets are told what serving tells them (head predictions: module docstring)."""
        return self.kind == "head"

    def stream_features(self, stream: Stream) -> np.ndarray:
        """Head predictions: each query's encoder features, (n, k)."""
        assert self.features is not None
        return np.array([self.features[pid] for pid in stream.problem_ids], dtype=float)

    def fold_calibrations(self, stream: Stream) -> tuple[Calibration, ...]:
        """For each fold, the calibration fitted on the other folds, weighted to the stream's composition."""
        if stream.name not in self._fitted:
            pred, obs, groups, problems, ok = self.calibration_set
            weights = query_weights(problems, stream.name)
            fold = np.array([fold_of(g, self.folds) for g in groups])
            bins = DEFAULT_BINS if self.calibration == "binned" else 1
            self._fitted[stream.name] = tuple(
                fit_calibration(pred[fold != f], obs[fold != f], bins=bins, weights=weights[fold != f],
                                censor_tokens=POOL_GENERATION_CAP_TOKENS, correct=ok[fold != f], shrink=self.shrink,
                                smoothing=self.smoothing,
                                clusters=np.asarray(groups)[fold != f])
                for f in range(self.folds)
            )
        return self._fitted[stream.name]

    def raw_thresholds(self, stream: Stream) -> np.ndarray:
        """The predictions as given, before calibration."""
        if self.kind == "oracle":
            return stream.tokens.astype(float)
        if self.kind == "oracle-noise":
            return log_noise(stream.tokens, self.sigma_raw, stream.seed + NOISE_SEED_OFFSET)
        assert self.table is not None
        missing = [pid for pid in stream.problem_ids if pid not in self.table]
        if missing:
            raise InvalidInputError(
                "predictions", self.spec, f"no prediction for {len(missing)} problems, e.g. {missing[0]!r}"
            )
        return np.array([self.table[pid] for pid in stream.problem_ids], dtype=float)

    @property
    def sigma_raw(self) -> float:
        """oracle-noise: the SIGMA of its spec."""
        return float(self.spec.split(":", 1)[1]) if self.kind == "oracle-noise" else self.sigma

    def _calibrated(self, stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw = self.raw_thresholds(stream)
        out = np.empty((3, raw.size))
        folds = np.array([fold_of(pid, self.folds) for pid in stream.problem_ids])
        for f, cal in enumerate(self.fold_calibrations(stream)):
            m = folds == f
            if m.any():
                out[:, m] = cal.apply(raw[m])
        return out[0], out[1], out[2]

    def thresholds(self, stream: Stream) -> np.ndarray:
        """The raw predicted thresholds of every query (what the paper's policies take at face value)."""
        return self.raw_thresholds(stream)

    def empirical(self, stream: Stream) -> EmpiricalLengths | None:
        """Each query's empirical length histogram (its fold's calibration bin), None when not calibrated."""
        if self.calibration == "head":
            cal = self.head.model.calibration
            return EmpiricalLengths(tuple(cal.histograms), cal.bin_of(self.raw_thresholds(stream)))
        if self.calibration_set is None:
            return None
        raw = self.raw_thresholds(stream)
        cals = self.fold_calibrations(stream)
        offsets = np.cumsum([0] + [len(c.histograms) for c in cals])
        which = np.empty(raw.size, dtype=np.int64)
        folds = np.array([fold_of(pid, self.folds) for pid in stream.problem_ids])
        for f, cal in enumerate(cals):
            m = folds == f
            if m.any():
                which[m] = offsets[f] + cal.bin_of(raw[m])
        return EmpiricalLengths(tuple(h for c in cals for h in c.histograms), which)

    def distribution(self, stream: Stream) -> tuple[np.ndarray, np.ndarray | float, np.ndarray | float]:
        """Each query's length distribution for the policies that price one: (median, spread, runaway share).

        Calibrated out of fold when the predictions are calibrated; else the raw
        thresholds with the one spread and no runaways.
        """
        if self.calibration == "head":
            median, sigma, runaway, _ = self.head.model.predict(self.stream_features(stream))
            return median, sigma, runaway
        if self.calibration_set is None:
            return self.raw_thresholds(stream), self.sigma, 0.0
        return self._calibrated(stream)


def parse_predictions(spec: str, log_sigma: float | None = None, *, calibration: str | None = "none",
                      problems=None, folds: int = DEFAULT_FOLDS, shrink: float = DEFAULT_SHRINK,
                      smoothing: float = SMOOTHING_LOG, pool_path=None, features_cache=None) -> Predictions:
    """Parse ``oracle``, ``oracle-noise:SIGMA``, ``head``, ``head:PATH`` or a path to a predictions JSONL.

    ``calibration`` None: each kind's default (``none`` for oracle, the head's own for a head, else
    ``binned``). ``pool_path`` and ``features_cache``: head predictions encode the pool's problems
    (:mod:`clear_bench.head_predictions`).

    ``calibration`` ``binned`` / ``global`` calibrates out of fold against the
    samples of ``problems`` (module docstring); ``log_sigma`` overrides the
    single spread of ``none``; ``shrink`` is the prior strength of the
    calibration bins' length histograms and ``smoothing`` the kernel width of the histograms
    (:func:`clear_core.calibration.fit_calibration`).
    """
    if spec == "head" or spec.startswith("head:"):
        return _head_predictions(spec, calibration, problems, folds, shrink, smoothing, pool_path, features_cache)
    if calibration is None:
        calibration = "none" if spec == "oracle" else "binned"
    if calibration not in CALIBRATIONS[:3]:
        raise InvalidInputError("calibration", calibration, f"expected one of {CALIBRATIONS[:3]}")
    if spec == "oracle":
        if calibration != "none":
            raise InvalidInputError("calibration", calibration, "oracle thresholds are exact")
        return Predictions(spec, "oracle", 0.0)
    if spec.startswith("oracle-noise:"):
        try:
            sigma = float(spec.split(":", 1)[1])
        except ValueError:
            raise InvalidInputError("predictions", spec, "expected oracle-noise:SIGMA with a number") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise InvalidInputError("predictions", spec, "SIGMA must be finite and >= 0")
        base = Predictions(spec, "oracle-noise", sigma if log_sigma is None else log_sigma)
        if calibration == "none":
            return base
        pairs = _noise_pairs(problems, sigma)
    else:
        if not Path(spec).is_file():
            raise InvalidInputError("predictions", spec, "not oracle, oracle-noise:SIGMA, head, head:PATH or an existing file")
        table = read_predictions(spec)
        if log_sigma is None:
            log_sigma = float(np.median(table.log_sigmas)) if table.log_sigmas else 0.0
        base = Predictions(spec, "file", log_sigma, table.thresholds)
        if calibration == "none":
            return base
        pairs = _file_pairs(problems, table.thresholds, spec)
    return Predictions(spec, base.kind, base.sigma, base.table, calibration, pairs, folds, shrink, smoothing)


def _head_predictions(spec, calibration, problems, folds, shrink, smoothing, pool_path, features_cache) -> Predictions:
    """``head`` / ``head:PATH`` (module docstring)."""
    from clear_bench.head_predictions import load_head_model, pool_features

    if calibration is None:
        calibration = "head"
    if calibration not in ("head", "binned"):
        raise InvalidInputError("calibration", calibration,
                                "head predictions are priced with the head's own calibration, or binned (out of "
                                "fold on the pool's true lengths); global and none do not apply")
    if problems is None or pool_path is None:
        raise InvalidInputError("predictions", spec, "needs the trace pool")
    path = spec.split(":", 1)[1] if ":" in spec else None
    if path is not None and not path:
        raise InvalidInputError("predictions", spec, "expected head or head:PATH to a head file")
    head = load_head_model(path)
    features = pool_features(pool_path, problems, head, features_cache)
    ids = [p.id for p in problems]
    _, sigma, _, raw = head.model.predict(np.array([features[i] for i in ids]))
    table = dict(zip(ids, raw.tolist()))
    pairs = _file_pairs(problems, table, spec) if calibration == "binned" else None
    return Predictions(spec, "head", float(np.median(sigma)), table, calibration, pairs, folds, shrink, smoothing,
                       head=head, features=features)


def _file_pairs(problems, thresholds: dict[str, float], spec: str):
    """(raw prediction, observed length, problem id, problems) for every sample of the pool.

    Every problem of the pool must have a prediction (the calibration set is
    weighted by the pool's strata).
    """
    if problems is None:
        raise InvalidInputError("calibration", spec, "needs the trace pool's problems")
    missing = [p.id for p in problems if p.id not in thresholds]
    if missing:
        raise InvalidInputError("predictions", spec, f"no prediction for {len(missing)} problems of the pool, e.g. {missing[0]!r}")
    pairs = pool_queries(problems)
    return (np.array([thresholds[p.id] for p, _ in pairs], dtype=float),
            np.array([p.samples[j].tokens for p, j in pairs], dtype=float), [p.id for p, _ in pairs], problems,
            np.array([p.samples[j].correct for p, j in pairs], dtype=bool))


def _noise_pairs(problems, sigma: float):
    """Every sample of the pool with its own log-normal noise draw (a calibration set for oracle-noise)."""
    if problems is None:
        raise InvalidInputError("calibration", f"oracle-noise:{sigma}", "needs the trace pool's problems")
    pairs = pool_queries(problems)
    tokens = np.array([p.samples[j].tokens for p, j in pairs], dtype=float)
    ok = np.array([p.samples[j].correct for p, j in pairs], dtype=bool)
    return log_noise(tokens, sigma, CALIBRATION_NOISE_SEED), tokens, [p.id for p, _ in pairs], problems, ok
