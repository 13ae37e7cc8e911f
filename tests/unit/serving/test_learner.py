"""The length learner's loop without Serve (deployments.learner.LengthLearner): observe, refit when due, validate
on held-out traffic, publish or roll back, resume from the log."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.calibration import fit_calibration
from clear_core.length_model import LengthModel, held_out_log_likelihood
from deployments.config import LearnerAdvanced
from deployments.learner import LengthLearner, ModelStore, observation_of
from deployments.traffic_log import TrafficLog, TrafficRecord, decode_features, encode_features

BETA = np.array([0.5, -0.3, 0.2, 0.1])


def prior_model(shift=1.2, seed=0):
    """A head that predicts e^shift times too long, with a calibration that believes it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, 4))
    raw = np.exp(x @ BETA + 5.0 + shift)
    cal = fit_calibration(raw, raw * np.exp(rng.normal(0, 0.4, raw.size)), bins=4, correct=np.ones(raw.size, bool))
    return LengthModel(BETA.copy(), 5.0 + shift, cal)


def traffic(n, seed=1, cap=None):
    """Records of requests whose true log length is x @ BETA + 5 + N(0, 0.4), run under ``cap`` (default: each
    request's own predicted length under the prior, so about a third end at their caps)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    length = np.maximum(np.round(np.exp(x @ BETA + 5.0 + rng.normal(0, 0.4, n))), 1)
    caps = np.full(n, cap) if cap is not None else np.round(np.exp(x @ BETA + 5.3)).astype(int)
    out = []
    for i in range(n):
        done = length[i] <= caps[i]
        out.append(TrafficRecord(
            time=float(i), request_id=f"r{seed}-{i}", tenant="t", model="m",
            prompt_sha256=TrafficRecord.prompt_hash(f"prompt {seed}-{i}"),
            prediction_source="minilm-ridge", predicted_threshold_tokens=100.0, raw_threshold_tokens=100.0,
            log_sigma=0.5, runaway=0.0, cap_tokens=int(caps[i]), tokens=int(min(length[i], caps[i])),
            ended="natural" if done else "cap", features=encode_features(x[i])))
    return out


def settings(**kw):
    return LearnerAdvanced(**{"refit_every": 200, "min_observations": 200, "window_observations": 5000, **kw})


def test_features_survive_the_record_to_float16_precision():
    x = np.random.default_rng(0).normal(0, 0.08, 384)
    back = decode_features(encode_features(x))
    assert back.shape == (384,) and np.max(np.abs(back - x)) < 1e-4
    assert len(encode_features(x)) == 4 * ((384 * 2 + 2) // 3)  # base64 of 768 bytes


@pytest.mark.parametrize("ended, tokens, expect", [
    ("natural", 90, (90.0, 120.0, True)),
    ("cap", 120, (120.0, 120.0, False)),
    ("client", 40, (40.0, 40.0, False)),  # a lower bound at what it generated
    ("failed", 0, None),  # nothing generated: no bound worth keeping
])
def test_what_a_record_says_about_a_length(ended, tokens, expect):
    (r,) = traffic(1)
    r = TrafficRecord(**{**r.__dict__, "ended": ended, "tokens": tokens, "cap_tokens": 120})
    obs = observation_of(r, 4)
    assert (None if obs is None else (obs.tokens, obs.cap, obs.finished)) == expect


def test_records_a_head_cannot_learn_from_are_not_observations():
    (r,) = traffic(1)
    assert observation_of(TrafficRecord(**{**r.__dict__, "features": None}), 4) is None
    assert observation_of(TrafficRecord(**{**r.__dict__, "prediction_source": "heuristic"}), 4) is None
    assert observation_of(r, 384) is None  # another head's width
    two = TrafficRecord(**{**r.__dict__, "choices": 2, "tokens": 100, "ended": "natural"})
    assert observation_of(two, 4).tokens == 50.0  # per choice


def test_a_refit_is_due_after_enough_new_observations_and_only_then():
    clock = [0.0]
    learner = LengthLearner(prior_model(), 10.0, settings(refit_interval_s=60.0), clock=lambda: clock[0])
    learner.observe(traffic(199))
    assert not learner.due()  # below min_observations
    learner.observe(traffic(1, seed=2))
    assert learner.due()
    learner.refit()
    learner.observe(traffic(10, seed=3))
    assert not learner.due()
    clock[0] = 61.0
    assert learner.due()  # something new, and the interval has passed


def test_the_learner_publishes_a_model_closer_to_the_traffic_and_resumes_it(tmp_path):
    url = str(tmp_path / "learner")
    log, store = TrafficLog(f"{url}/traffic", segment_records=100), ModelStore(url)
    learner = LengthLearner(prior_model(), 10.0, settings(), log, store)
    learner.observe(traffic(1000))
    learner.flush_log(force=True)
    report = learner.refit()
    assert report.outcome == "published" and learner.current.version == 1
    ll = report.heldout_log_likelihood
    assert ll["candidate"] > ll["current"] == ll["prior"]  # version 0 is the prior
    assert abs(learner.current.intercept - 5.0) < 0.15  # the truth's, not the prior's 6.2
    fresh = traffic(500, seed=9)  # traffic neither has seen: the learned model describes it better
    x = np.array([decode_features(r.features) for r in fresh])
    args = (x, [r.tokens for r in fresh], [r.cap_tokens for r in fresh], [r.ended == "natural" for r in fresh])
    assert held_out_log_likelihood(learner.current, *args) > held_out_log_likelihood(learner.prior, *args) + 0.1

    again = LengthLearner(prior_model(), 10.0, settings(), TrafficLog(f"{url}/traffic"), ModelStore(url))
    assert again.resume() == 1000
    assert again.current.version == 1 and np.allclose(again.current.coef, learner.current.coef)
    assert [o.tokens for o in again.window] == [o.tokens for o in learner.window]


def drifted(model, by, version):
    return LengthModel(model.coef, model.intercept + by, model.calibration, version=version)


def test_when_the_starting_head_beats_the_model_in_service_and_the_candidate_it_is_rolled_back(tmp_path, monkeypatch):
    good = prior_model(shift=0.0)  # the starting head describes this traffic
    learner = LengthLearner(good, 10.0, settings(), store=ModelStore(str(tmp_path)))
    learner.current = drifted(good, 1.5, version=3)
    monkeypatch.setattr(LengthModel, "refitted", lambda self, *a, **k: drifted(good, -1.0, self.version + 1))
    learner.observe(traffic(1000))
    report = learner.refit()
    ll = report.heldout_log_likelihood
    assert ll["prior"] > max(ll["current"], ll["candidate"])
    assert report.outcome == "rolled_back" and learner.current.version == 4
    assert np.array_equal(learner.current.coef, good.coef) and learner.current.intercept == good.intercept
    assert ModelStore(str(tmp_path)).current()["version"] == 4


def test_a_candidate_worse_than_the_model_in_service_is_not_published(tmp_path, monkeypatch):
    good = prior_model(shift=0.0)
    learner = LengthLearner(prior_model(shift=1.2), 10.0, settings(), store=ModelStore(str(tmp_path)))
    learner.current = LengthModel(good.coef, good.intercept, good.calibration, version=2)
    monkeypatch.setattr(LengthModel, "refitted", lambda self, *a, **k: drifted(good, 0.8, self.version + 1))
    learner.observe(traffic(1000))
    report = learner.refit()
    assert report.outcome == "kept" and learner.current.version == 2 and learner.current.intercept == good.intercept
    assert ModelStore(str(tmp_path)).current() is None  # nothing written


def test_the_window_is_bounded_and_keeps_the_newest():
    learner = LengthLearner(prior_model(), 10.0, settings(window_observations=300))
    learner.observe(traffic(500))
    assert len(learner.window) == 300 and learner.counts["observations"] == 500


# -- the other replicas' side (deployments.learner_client) ---------------------------------------------------


class _Flaky:
    """A learner handle whose observe fails while ``down``."""

    def __init__(self):
        from tests.fakes import RemoteCall, RemoteMethod

        self._call = RemoteCall
        self.down, self.got = True, []
        self.observe = RemoteMethod(self._observe)

    def _observe(self, batch):
        if self.down:
            raise ConnectionError("learner restarting")
        self.got.extend(batch)
        return self._call(len(batch))


def test_the_sender_keeps_records_while_the_learner_is_away_and_bounds_what_it_keeps(monkeypatch):
    import asyncio

    import deployments.learner_client as lc

    monkeypatch.setattr(lc, "MAX_BUFFERED", 100)
    monkeypatch.setattr(lc, "SEND_BATCH", 10_000)  # only the explicit sends below
    monkeypatch.setattr(lc, "SEND_AFTER_S", 3600.0)
    learner = _Flaky()
    records = traffic(150)

    async def run():
        sender = lc.ObservationSender(learner)
        for r in records[:80]:
            sender.add(r)
        assert await sender.send() == 0 and learner.got == []  # refused: kept, in order
        for r in records[80:]:
            sender.add(r)
        learner.down = False
        assert await sender.send() == 100
        return sender

    sender = asyncio.run(run())
    assert sender.dropped == 50 and sender.sent == 100
    assert [r["request_id"] for r in learner.got] == [r.request_id for r in records[50:]]  # the oldest dropped


def test_a_lone_record_is_sent_within_the_batch_wait(monkeypatch):
    import asyncio

    import deployments.learner_client as lc

    monkeypatch.setattr(lc, "SEND_AFTER_S", 0.05)
    learner = _Flaky()
    learner.down = False

    async def run():
        sender = lc.ObservationSender(learner)
        sender.add(traffic(1)[0])
        assert learner.got == []
        await asyncio.sleep(0.2)  # no later record comes to fill the batch: the timer sends it
        return sender

    assert asyncio.run(run()).sent == 1 and len(learner.got) == 1


def test_the_allocator_prices_the_histograms_of_the_model_it_is_given():
    from clear_core.length_model import LengthModel
    from clear_predictor.head import load_head
    from deployments.allocator import Allocator
    from deployments.config import AllocatorConfig

    head = load_head()
    cfg = AllocatorConfig(policy="clear-cost-emp", budget={"mode": "per_query", "tokens_per_query": 256,
                                                           "window_queries": 100, "refund_unused": True})
    alloc = Allocator(cfg, max_completion_tokens=8192, metrics=False, length_calibration=head.calibration.as_dict())
    before = alloc.reserve_sync("a", 300.0, raw_threshold_tokens=300.0)
    learned = prior_model()  # 4 bins: another binning than the head's 8 is refused
    with pytest.raises(ValueError):
        alloc._apply_model(learned)
    cal = head.calibration
    shorter = type(cal)(cal.centres, cal.log_bias, cal.log_sigma, cal.n, cal.runaway,
                        tuple(h.__class__(h.correct[8:] + (0.0,) * 8, h.wrong[8:] + (0.0,) * 8,
                                          h.runaway + sum(h.correct[:8]) + sum(h.wrong[:8])) for h in cal.histograms))
    alloc._apply_model(LengthModel(head.coef, head.intercept, shorter, version=5))
    assert alloc.model_version == 5 and alloc.status_sync()["length_model_version"] == 5
    assert alloc.market.lengths[0] is shorter.histograms[0]
    after = alloc.reserve_sync("b", 300.0, raw_threshold_tokens=300.0)
    assert (before.cap_tokens, after.cap_tokens) != (0, 0) and after.market_cap_tokens != before.market_cap_tokens


def test_the_status_is_json_before_anything_can_be_measured():
    """An empty window has no cap coverage and no held-out error: null, not NaN (which /v1/clear/status cannot
    send)."""
    import json

    learner = LengthLearner(prior_model(), 10.0, settings())
    status = learner.status()
    assert status["cap_coverage"] is None and status["heldout_abs_log_error"] is None
    json.dumps(status, allow_nan=False)
    learner.observe(traffic(5))
    json.dumps(learner.status(), allow_nan=False)


def test_the_held_out_observations_are_whole_prompts_and_one_prompt_alone_is_not_refitted():
    records = traffic(600)
    again = [TrafficRecord(**{**r.__dict__, "request_id": r.request_id + "-again"}) for r in records]
    learner = LengthLearner(prior_model(), 10.0, settings())
    learner.observe(records + again)  # every prompt asked twice
    report = learner.refit()
    assert report.train + report.holdout == 1200 and report.holdout % 2 == 0
    assert 0.1 < report.holdout / 1200 < 0.3  # about holdout_share of the prompts
    lone = LengthLearner(prior_model(), 10.0, settings())
    lone.observe([TrafficRecord(**{**r.__dict__, "prompt_sha256": "0" * 64}) for r in records])
    assert lone.refit().outcome == "kept" and lone.current.version == 0  # nothing to check a candidate on


def test_the_learners_background_thread_runs_below_the_request_path_and_only_it():
    import os
    from concurrent.futures import ThreadPoolExecutor

    from deployments.learner import REFIT_NICENESS, _lower_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    with ThreadPoolExecutor(1, initializer=_lower_priority) as worker:
        inside = worker.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
    assert inside == min(before + REFIT_NICENESS, 19)  # Linux: niceness is a thread's own
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller (the replica's event loop) keeps its own
