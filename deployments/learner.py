"""The length learner: the service's length model refitted online from what its requests generated.

The ingress replicas send the learner a record of each settled request
(:class:`deployments.traffic_log.TrafficRecord`: the encoder features the
predictor read, the cap, the tokens generated and how it ended). The learner
is one replica, off the request path:

1. **It keeps the log**: every record is appended to the traffic log
   (bounded, rotated segments under ``learner.advanced.log_url``), and the
   usable ones (features of the learned head, something generated) to a
   window of the most recent observations, ``window_observations`` long.
   A request that ended by itself is an observed length; one stopped at its
   cap, by its client or by a failure only a lower bound (censored).
2. **It refits when due**: after ``refit_every`` new observations, or
   ``refit_interval_s`` after the last refit when anything new came, once
   it holds ``min_observations``. The window's observations of a share
   ``holdout_share`` of prompts (whole prompts, picked by a hash of their
   SHA-256: :func:`clear_core.length_model.held_out_groups`) are held out,
   the rest fitted on. The candidate is the model refitted towards the
   starting head (:meth:`clear_core.length_model.LengthModel.refitted`: the
   censored ridge head, its strength chosen on the held-out prompts, then
   the calibration), on one BLAS thread in a worker thread.
3. **It validates**: the starting head, the model in service and the
   candidate are scored on the held-out observations with the censored
   likelihood of what they serve (:func:`clear_core.length_model.held_out_log_likelihood`).
   The candidate is published when it is at least as good as the model in
   service and better than the starting head by at least three standard
   errors of the difference (clustered by prompt); when the starting head
   beats the model in service by as much, the service rolls back to it
   (published as a new version); otherwise nothing changes.
4. **It publishes** a versioned model (``models/vNNNNNN.json`` and
   ``models/current.json`` beside the log). The predictor, allocator and
   ingress replicas poll :meth:`Learner.model` every ``poll_s`` and swap
   what they price with (:mod:`deployments.learner_client`). A bin means the
   same range of raw predictions in every version (the refit keeps the
   starting head's bin centres), so a swap never re-indexes a pricing window.
5. **It resumes**: a new learner replica (a restart, a redeploy, a new
   ``serve run`` on the same state directory) loads the current model and
   re-reads the log's newest records into its window.

A request with ``n`` choices is one observation of ``tokens / n`` per
choice (the choices' lengths are not logged apart). Abandoned requests are
never generated and never observed; exploration (:mod:`clear_core.exploration`)
serves a few of them at a probe cap so the model can learn it was wrong
about them.
"""

from __future__ import annotations

import asyncio
import json
import os
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from clear_core.length_model import LengthModel, held_out_groups, prompt_group, validated_refit
from deployments.background import cancel_on_stop, stop_if_cancelled
from deployments.traffic_log import TrafficLog, TrafficRecord, decode_features

logger = logging.getLogger("ray.serve")

#: Published models kept beside the current one.
KEEP_MODELS = 20
#: How often the learner checks whether a refit is due, s.
CHECK_EVERY_S = 1.0
#: How much nicer than its replica the thread the learner refits in runs: below the request path wherever
#: they share cores (the embedded default runs every deployment on one machine; a refit takes seconds).
REFIT_NICENESS = 10


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority by :data:`REFIT_NICENESS` (Linux schedules threads: this
    thread only; pid 0 is the calling thread)."""
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(now + REFIT_NICENESS, 19))
    except (AttributeError, OSError):  # no setpriority on this platform: the refit runs at normal priority
        pass


@dataclass(frozen=True)
class Observation:
    features: np.ndarray
    tokens: float  # per choice
    cap: float  # per choice; a lower bound on the length when not finished
    finished: bool
    group: int = 0  # the prompt's group (clear_core.length_model.prompt_group of its SHA-256)


def observation_of(record: TrafficRecord, width: int) -> Observation | None:
    """What a record says about its length under a head of ``width`` features (None: nothing usable)."""
    if record.features is None or record.prediction_source != "minilm-ridge":
        return None
    x = decode_features(record.features)
    choices = max(int(record.choices), 1)
    per_choice = float(record.tokens) / choices
    if x.size != width or not np.all(np.isfinite(x)) or record.cap_tokens < 1:
        return None
    try:
        group = prompt_group(record.prompt_sha256)
    except (TypeError, ValueError):  # no usable digest: a group of its own features
        group = prompt_group(TrafficRecord.prompt_hash(record.features))
    if record.ended == "natural":
        return Observation(x, per_choice, float(record.cap_tokens), True, group)
    if record.ended == "cap":
        return Observation(x, per_choice, float(record.cap_tokens), False, group)
    if per_choice < 1:  # cut before anything was generated: no bound worth the name
        return None
    return Observation(x, per_choice, per_choice, False, group)  # client gone or failed: at least what it generated


class ModelStore:
    """Published models under ``<url>/models``: one file per version and ``current.json``."""

    def __init__(self, url: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = f"{root}/models"
        self.fs.makedirs(self.root, exist_ok=True)

    def publish(self, model: LengthModel) -> None:
        doc = json.dumps(model.as_dict())
        with self.fs.open(f"{self.root}/v{model.version:06d}.json", "w") as f:
            f.write(doc)
        with self.fs.open(f"{self.root}/current.json", "w") as f:
            f.write(doc)
        for old in sorted(self.fs.glob(f"{self.root}/v*.json"))[:-KEEP_MODELS]:
            self.fs.rm(old)

    def current(self) -> dict | None:
        try:
            with self.fs.open(f"{self.root}/current.json", "r") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


@dataclass
class RefitReport:
    outcome: str  # published | kept | rolled_back
    version: int  # the model in service after it
    train: int
    holdout: int
    heldout_log_likelihood: dict  # prior / current / candidate: per held-out observation
    seconds: float
    alpha: float = math.nan  # the head's ridge strength chosen for the candidate


@dataclass
class LengthLearner:
    """The learning loop without Serve (module docstring): observe, refit when due, validate, publish."""

    prior: LengthModel
    alpha: float  # the head's ridge towards the prior (clear_predictor.head.RidgeHead.learning_alpha)
    advanced: object  # deployments.config.LearnerAdvanced
    log: TrafficLog | None = None
    store: ModelStore | None = None
    clock: object = time.monotonic
    current: LengthModel = field(init=False)
    window: deque = field(init=False)
    counts: dict = field(default_factory=lambda: {"records": 0, "observations": 0, "censored": 0, "explored": 0,
                                                  "explored_tokens": 0})
    last: RefitReport | None = None
    _new: int = 0
    _last_refit: float = field(init=False)

    def __post_init__(self):
        self.current = self.prior
        self.window = deque(maxlen=int(self.advanced.window_observations))
        self._last_refit = self.clock()

    @property
    def width(self) -> int:
        return int(self.prior.coef.size)

    def resume(self) -> int:
        """Load the published model and re-read the log's newest records into the window; how many."""
        if self.store is not None:
            doc = self.store.current()
            if doc is not None:
                try:
                    model = LengthModel.from_dict(doc)
                except Exception:  # a model of another format or head: start from the prior
                    logger.warning("learner: the published model could not be read; starting from the head")
                else:
                    if model.coef.size == self.width and len(model.calibration.centres) == len(
                            self.prior.calibration.centres):
                        self.current = model
        if self.log is None:
            return 0
        n = 0
        for record in self.log.read_tail(int(self.advanced.window_observations)):
            obs = observation_of(record, self.width)
            if obs is not None:
                self.window.append(obs)
                n += 1
        return n

    def observe(self, records: list[TrafficRecord]) -> int:
        """Log ``records`` and keep their observations; how many were usable."""
        used = 0
        for record in records:
            self.counts["records"] += 1
            if record.explored:
                self.counts["explored"] += 1
                self.counts["explored_tokens"] += int(record.tokens)
            if self.log is not None:
                self.log.append(record, flush=False)
            obs = observation_of(record, self.width)
            if obs is None:
                continue
            self.window.append(obs)
            self.counts["observations"] += 1
            self.counts["censored"] += int(not obs.finished)
            self._new += 1
            used += 1
        return used

    def flush_log(self, force: bool = False) -> None:
        if self.log is not None and (force or self.log.due):
            self.log.flush()

    def due(self) -> bool:
        adv = self.advanced
        if len(self.window) < adv.min_observations or self._new == 0:
            return False
        return self._new >= adv.refit_every or self.clock() - self._last_refit >= adv.refit_interval_s

    def _arrays(self, rows) -> tuple[np.ndarray, ...]:
        return (np.array([o.features for o in rows]), np.array([o.tokens for o in rows]),
                np.array([o.cap for o in rows]), np.array([o.finished for o in rows]))

    def refit(self) -> RefitReport:
        """One refit of the window (module docstring, 2-4)."""
        t0 = time.perf_counter()
        self._new, self._last_refit = 0, self.clock()
        rows = list(self.window)
        held = held_out_groups([o.group for o in rows], self.advanced.holdout_share)
        if held.all() or not held.any():  # every prompt on one side: nothing to check a candidate on
            self.last = RefitReport("kept", self.current.version, int((~held).sum()), int(held.sum()), {},
                                    time.perf_counter() - t0)
            return self.last
        train = self._arrays([o for o, h in zip(rows, held) if not h])
        decision = validated_refit(self.current, self.prior, train, self._arrays([o for o, h in zip(rows, held) if h]),
                                   alpha=self.alpha, prior_weight=self.advanced.prior_weight,
                                   train_groups=[o.group for o, h in zip(rows, held) if not h],
                                   held_groups=[o.group for o, h in zip(rows, held) if h])
        cut = int((~held).sum())
        outcome, score = decision.outcome, decision.heldout_log_likelihood
        if outcome != "kept":
            publish = LengthModel(decision.model.coef, decision.model.intercept, decision.model.calibration,
                                  decision.model.version, {**decision.model.meta, "train": cut, "holdout": len(rows) - cut})
            if self.store is not None:
                self.store.publish(publish)
            self.current = publish
        self.last = RefitReport(outcome, self.current.version, cut, len(rows) - cut, score, time.perf_counter() - t0,
                                decision.alpha)
        return self.last

    def heldout_abs_log_error(self) -> float:
        """Mean |ln median - ln length| of the window's finished observations of held-out prompts under the
        model in service."""
        window = list(self.window)
        held = held_out_groups([o.group for o in window], self.advanced.holdout_share) if window else []
        rows = [o for o, h in zip(window, held) if h and o.finished and o.tokens >= 1]
        if not rows:
            return math.nan
        x, tokens, _, _ = self._arrays(rows)
        median = self.current.predict(x)[0]
        return float(np.mean(np.abs(np.log(median) - np.log(tokens))))

    def status(self) -> dict:
        """What the learner holds and did (JSON: an undefined share or error, with nothing to measure it on, is null)."""
        return _finite(self._status())

    def _status(self) -> dict:
        window = list(self.window)
        finished = sum(o.finished for o in window)
        capped = [o for o in window if not o.finished and o.tokens >= o.cap]
        return {
            "model_version": self.current.version,
            "observations": self.counts["observations"],
            "records": self.counts["records"],
            "window": len(window),
            "censored_share": (1.0 - finished / len(window)) if window else 0.0,
            # admitted requests whose length fit their cap: the caps' coverage
            "cap_coverage": (finished / (finished + len(capped))) if finished + len(capped) else math.nan,
            "explored_requests": self.counts["explored"],
            "explored_tokens": self.counts["explored_tokens"],
            "heldout_abs_log_error": self.heldout_abs_log_error(),
            "last_refit": None if self.last is None else {
                "outcome": self.last.outcome, "version": self.last.version, "train": self.last.train,
                "holdout": self.last.holdout, "heldout_log_likelihood": self.last.heldout_log_likelihood,
                "seconds": self.last.seconds, "alpha": self.last.alpha},
        }


def _finite(value):
    """``value`` with every NaN or infinite float, at any depth, replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Learner:
    """The Serve deployment around :class:`LengthLearner` (module docstring); always one replica."""

    def __init__(self, config, url: str):
        """``url``: where the log and the models are kept (:meth:`deployments.config.AppConfig.learner_url`)."""
        from clear_predictor.head import load_head

        from deployments.metrics import LearnerMetrics

        adv = config.learner.advanced
        head = load_head(config.predictor.head_path)
        log = TrafficLog(f"{url}/traffic", segment_records=adv.log_segment_records, max_segments=adv.log_max_segments,
                         store_prompts=adv.log_prompts, flush_after_s=adv.log_flush_s)
        self.core = LengthLearner(head.length_model(), head.learning_alpha, adv, log, ModelStore(url))
        resumed = self.core.resume()
        logger.info("learner: model version %d, %d observations re-read from %s", self.core.current.version,
                    resumed, url)
        self.metrics = LearnerMetrics()
        self.metrics.observe(self.core.status())
        self._refitting = False
        # Refits and log writes run in one background thread of low priority, off the replica's event loop.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="learner", initializer=_lower_priority)
        self._task = asyncio.get_event_loop().create_task(self._loop())

    async def observe(self, records: list[dict]) -> int:
        """Records of settled requests (dicts of :class:`TrafficRecord`), from the ingress replicas."""
        got = [TrafficRecord(**r) for r in records]
        used = self.core.observe(got)
        self.metrics.observed(got)
        return used

    async def model(self, known_version: int) -> dict | None:
        """The model in service when it is not ``known_version`` (None: the caller has it)."""
        current = self.core.current
        return None if current.version == int(known_version) else current.as_dict()

    async def status(self) -> dict:
        return self.core.status()

    async def refit_now(self) -> dict:
        """Refit at once (operators and tests); the report."""
        report = await self._background(self._refit)
        return report.__dict__

    async def _background(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def _refit(self) -> RefitReport:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # the fit is small; BLAS threads would only contend with the replica's others
            report = self.core.refit()
        self.metrics.refitted(report)
        logger.info("learner: refit %s, version %d, held-out log-likelihood %s, %.2f s", report.outcome,
                    report.version, {k: round(v, 4) for k, v in report.heldout_log_likelihood.items()},
                    report.seconds)
        return report

    async def _loop(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                if self.core.log is not None and self.core.log.due:
                    await self._background(self.core.flush_log)
                if self.core.due():
                    await self._background(self._refit)
                self.metrics.observe(self.core.status())
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop outlives a failed refit or write; the model in service stays
                logger.exception("learner: refit or log write failed")

    def __del__(self):
        cancel_on_stop(getattr(self, "_task", None))
        try:
            self.core.flush_log(force=True)
        except Exception:
            pass
