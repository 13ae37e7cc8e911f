"""Training, checkpoints and inference of the transformer regressor on a tiny random BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clear_core.errors import InvalidInputError
from clear_predictor.batching import bucketed_batches, tokenize
from clear_predictor.data import build_dataset
from clear_predictor.inference import MAX_LOG, ThresholdPredictor
from clear_predictor.model import METADATA_FILE, load_checkpoint, save_checkpoint
from clear_predictor.train import TrainConfig, TransformerRegressor, fit_regressor, train

from predictor_helpers import synthetic_texts, write_pool

FAST = dict(batch_size=8, lr=3e-3, head_lr=3e-3, head_init="random", device="cpu", progress=False, max_length=64)


def test_training_lowers_the_loss(tiny_parts):
    model, tok = tiny_parts(seed=0)
    texts, y = synthetic_texts(64, seed=0)
    before = float(np.mean((model_predict(model, tok, texts) - y) ** 2))
    epoch_losses, step_losses = fit_regressor(model, tok, texts, y, TrainConfig(epochs=6, **FAST))
    after = float(np.mean((model_predict(model, tok, texts) - y) ** 2))
    assert len(epoch_losses) == 6 and len(step_losses) == 6 * 8
    assert epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert after < 0.5 * before


def model_predict(model, tok, texts):
    from clear_predictor.inference import predict_log_batched

    return predict_log_batched(model, tok, texts, 64, 16, "cpu")


def test_seeded_training_is_reproducible(tiny_parts):
    texts, y = synthetic_texts(32, seed=1)
    preds = []
    for _ in range(2):
        reg = TransformerRegressor(TrainConfig(epochs=2, seed=3, **FAST), build=lambda: tiny_parts(seed=3))
        preds.append(reg.fit(texts, y).predict_log(texts))
    np.testing.assert_allclose(preds[0], preds[1], rtol=0, atol=1e-5)


def test_save_load_gives_identical_predictions(tiny_parts, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", n=30)
    from clear_core.traces import load_pool

    data = build_dataset(load_pool(pool))
    model, tok = tiny_parts(seed=0)
    res = train(data, TrainConfig(epochs=2, val_fraction=0.2, seed=5, **FAST), model=model, tokenizer=tok)
    assert res.metadata.n_val == 6 and res.metadata.n_train == 24
    assert res.metadata.log_sigma_source == "validation" and res.metadata.log_sigma > 0
    out = save_checkpoint(res.model, res.tokenizer, res.metadata, tmp_path / "ckpt")
    meta = json.loads((out / METADATA_FILE).read_text())
    for key in ("log_sigma", "seed", "epochs", "backbone", "created_utc"):
        assert key in meta
    prompts = list(data.texts) + ["", "what is the sum " * 500]
    direct = np.exp(np.clip(model_predict(res.model, res.tokenizer, prompts), 0, MAX_LOG))
    loaded = ThresholdPredictor.from_checkpoint(out, device="cpu", batch_size=7)
    np.testing.assert_allclose(loaded.predict(prompts), direct, rtol=1e-5)
    assert loaded.log_sigma == pytest.approx(res.metadata.log_sigma)
    model2, tok2, meta2 = load_checkpoint(out)
    assert tok2.truncation_side == "left" and meta2.seed == 5
    assert model2.config.target_std == pytest.approx(res.model.config.target_std)


def test_predictions_positive_finite_for_edge_prompts(tiny_parts, tmp_path):
    model, tok = tiny_parts(seed=0)
    texts, y = synthetic_texts(16)
    fit_regressor(model, tok, texts, y, TrainConfig(epochs=1, **FAST))
    from clear_predictor.model import TrainingMetadata

    meta = TrainingMetadata(backbone="tiny", seed=0, epochs=1, batch_size=8, lr=1e-3, head_lr=1e-3,
                            weight_decay=0.01, max_length=64, n_train=16, n_val=0, log_sigma=0.5,
                            log_sigma_source="train")
    pred = ThresholdPredictor(model, tok, meta, device="cpu", batch_size=4)
    prompts = ["", " ", "x" * 200_000, "the sum " * 50_000, "\u00e9\u4e2d\U0001f600", "hard easy"]
    out = pred.predict(prompts)
    assert out.shape == (len(prompts),) and out.dtype == np.float64
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    assert pred.predict([]).shape == (0,)
    with pytest.raises(InvalidInputError):
        pred.predict("one string, not a list")
    with pytest.raises(InvalidInputError):
        pred.predict([None])


def test_left_truncation_keeps_the_end(tiny_parts):
    _, tok = tiny_parts()
    text = "apples " * 100 + "prove the triangle area"
    ids = tokenize(tok, [text], max_length=8)[0]
    assert len(ids) == 8
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert words[1:-1] == ["apples", "apples", "prove", "the", "triangle", "area"]


def test_bucketed_batches_cover_every_row_once():
    lengths = np.random.default_rng(0).integers(1, 300, size=101)
    for rng in (None, np.random.default_rng(1)):
        batches = bucketed_batches(lengths, 8, rng)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(101))
        assert max(len(b) for b in batches) == 8


def test_bad_config_is_a_typed_error(tiny_parts):
    model, tok = tiny_parts()
    with pytest.raises(InvalidInputError):
        fit_regressor(model, tok, ["a"], np.array([1.0]), TrainConfig(epochs=0, **{**FAST}))
    with pytest.raises(InvalidInputError):
        fit_regressor(model, tok, ["a", "b"], np.array([1.0]), TrainConfig(epochs=1, **FAST))
    with pytest.raises(InvalidInputError):
        fit_regressor(model, tok, ["a"], np.array([np.nan]), TrainConfig(epochs=1, **FAST))
    with pytest.raises(InvalidInputError):
        from clear_predictor.model import from_encoder
        from predictor_helpers import make_tiny_encoder

        from_encoder(make_tiny_encoder(len(tok)), tok, max_length=4096)  # beyond 128 positions
    assert torch.get_num_threads() >= 1


def test_linear_probe_head_init_fits_before_any_step(tiny_parts):
    """LP-FT: the ridge head on frozen features fits the training targets better than a random head."""
    from clear_predictor.batching import pad_token_id
    from clear_predictor.train import linear_probe_init, pooled_features

    model, tok = tiny_parts(seed=0)
    texts, y = synthetic_texts(64, seed=2)
    z = (y - y.mean()) / y.std()
    ids = tokenize(tok, texts, 64)
    feats = pooled_features(model, ids, pad_token_id(tok), "cpu")
    assert feats.shape == (64, 32) and np.all(np.isfinite(feats))
    model.set_target_scale(float(y.mean()), float(y.std()))
    random_mse = float(np.mean((model_predict(model, tok, texts) - y) ** 2))
    alpha = linear_probe_init(model, feats, z)
    probe_mse = float(np.mean((model_predict(model, tok, texts) - y) ** 2))
    assert alpha > 0 and probe_mse < 0.7 * random_mse
    # fine-tuning from the probe (the default) starts where the probe is
    _, steps = fit_regressor(model, tok, texts, y, TrainConfig(epochs=3, **{**FAST, "head_init": "ridge"}))
    assert np.all(np.isfinite(steps))
    assert float(np.mean((model_predict(model, tok, texts) - y) ** 2)) < random_mse


def test_inference_batches_respect_a_token_budget():
    lengths = [5] * 50 + [500] * 10
    batches = bucketed_batches(lengths, 128, max_batch_tokens=1000)
    assert sorted(np.concatenate(batches).tolist()) == list(range(60))
    for b in batches:
        assert len(b) <= 128 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000)
    assert bucketed_batches([2000], 8, max_batch_tokens=1000)[0].tolist() == [0]  # one long prompt still runs
