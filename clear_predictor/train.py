"""Fine-tune the length regressor (paper recipe, Sec. 5.1).

MSE on log length, AdamW (lr 2e-5, weight decay 0.01), batch 32, left
truncation to the last ``max_length`` tokens. Three additions for short CPU
runs (the paper trains 10 epochs on ~15k problems, thousands of steps; a CPU
cross-validation here affords ~150 steps per fold), all configurable:

* linear probe, then fine-tune (LP-FT, Kumar et al. 2022): before the first
  step the head is set by a ridge regression (alpha by leave-one-out GCV) of
  the standardised target on the frozen encoder's mean-pooled features
  (``head_init="ridge"``; ``"random"`` for the plain recipe). With a random head,
  one epoch of the recipe leaves the head far from fitted (out-of-fold Spearman
  below a ridge on frozen features);
* the head has its own learning rate (``head_lr``, default 1e-4);
* the learning rate warms up linearly over the first 6% of steps, then decays
  linearly to 0.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm.auto import tqdm

from clear_core.errors import InvalidInputError
from clear_predictor.batching import bucketed_batches, collate, pad_token_id, tokenize
from clear_predictor.config import TrainConfig
from clear_predictor.data import LengthDataset, query_arrays, safe_log_tokens
from clear_predictor.features import encode_ids
from clear_predictor.inference import predict_log_batched
from clear_predictor.model import (
    LengthRegressor,
    TrainingMetadata,
    build_regressor,
    pick_device,
)


@dataclass
class TrainResult:
    model: LengthRegressor
    tokenizer: object
    metadata: TrainingMetadata
    epoch_losses: list[float] = field(default_factory=list)  # mean standardised MSE per epoch
    step_losses: list[float] = field(default_factory=list)  # standardised MSE per step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: LengthRegressor, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.encoder.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [model.head.weight], "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
        {"params": [model.head.bias], "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def pooled_features(model: LengthRegressor, ids: list[list[int]], pad: int, device, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled outputs of the model's encoder (eval mode), one row per tokenised prompt."""
    return encode_ids(model.encoder, ids, pad, device, batch_size)


def linear_probe_init(model: LengthRegressor, feats: np.ndarray, z: np.ndarray) -> float:
    """Set the head to a ridge fit of ``z`` on frozen features; returns the chosen alpha."""
    from sklearn.linear_model import RidgeCV

    ridge = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(feats, z)
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(ridge.coef_, dtype=model.head.weight.dtype).view(1, -1))
        model.head.bias.fill_(float(ridge.intercept_))
    return float(ridge.alpha_)


def fit_regressor(
    model: LengthRegressor, tokenizer, texts: Sequence[str], targets: np.ndarray, cfg: TrainConfig
) -> tuple[list[float], list[float]]:
    """Train in place on (texts, log-length targets). Returns (epoch losses, step losses)."""
    cfg.validate()
    y = np.asarray(targets, dtype=float)
    if y.shape != (len(texts),) or len(texts) == 0:
        raise InvalidInputError("targets", y.shape, f"need one finite target per text ({len(texts)} texts)")
    if not np.all(np.isfinite(y)):
        raise InvalidInputError("targets", "non-finite", "targets must be finite log lengths")
    device = pick_device(cfg.device)
    model.to(device).train()
    model.set_target_scale(float(y.mean()), float(y.std()))
    z = torch.as_tensor((y - model.config.target_mean) / model.config.target_std, dtype=torch.float32)
    ids = tokenize(tokenizer, texts, cfg.max_length)
    lengths = [len(r) for r in ids]
    pad = pad_token_id(tokenizer)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(round(cfg.warmup_fraction * total))) if cfg.warmup_fraction > 0 else 0
    if cfg.head_init == "ridge" and len(ids) >= 2:
        feats = pooled_features(model, ids, pad, device, cfg.eval_batch_size)
        linear_probe_init(model, feats, z.numpy().astype(np.float64))
    model.train()
    opt = _optimizer(model, cfg)

    def schedule(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    epoch_losses, step_losses = [], []
    # disable=None: a bar only on a terminal (a redirected log gets no carriage-return line)
    bar = tqdm(total=total, desc="train", unit="step", disable=None if cfg.progress else True, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        running, seen = 0.0, 0
        for idx in bucketed_batches(lengths, cfg.batch_size, rng):
            batch = collate([ids[i] for i in idx], pad, device)
            pred = model.standardized(**batch)
            loss = torch.nn.functional.mse_loss(pred, z[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            lv = float(loss.detach().cpu())
            step_losses.append(lv)
            running += lv * len(idx)
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{lv:.3f}")
        epoch_losses.append(running / max(1, seen))
    bar.close()
    model.eval()
    return epoch_losses, step_losses


def _split(data: LengthDataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grouped (by problem id) random split: (train rows, validation rows)."""
    n = len(data)
    if fraction <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    groups = np.unique(data.groups.astype(str))
    rng = np.random.default_rng(seed + 7919)
    n_val = max(1, int(round(fraction * len(groups))))
    if n_val >= len(groups):
        raise InvalidInputError("val_fraction", fraction, f"leaves no training problems ({len(groups)} problems)")
    val_groups = set(rng.choice(groups, size=n_val, replace=False).tolist())
    is_val = np.array([g in val_groups for g in data.groups.astype(str)])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def query_rmse(data: LengthDataset, pred_log: np.ndarray) -> float:
    """RMS of log(query tokens) - predicted log length over every (problem, sample) pair."""
    pq, tokens, _ = query_arrays(data, pred_log)
    return float(np.sqrt(np.mean((safe_log_tokens(tokens) - pq) ** 2)))


def train(data: LengthDataset, cfg: TrainConfig | None = None, model=None, tokenizer=None) -> TrainResult:
    """Seed, build (unless ``model``/``tokenizer`` are given), split, fit, measure ``log_sigma``."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    seed_everything(cfg.seed)
    backbone = cfg.backbone
    if model is None or tokenizer is None:
        model, tokenizer, backbone = build_regressor(cfg.backbone, cfg.max_length)
    tr, va = _split(data, cfg.val_fraction, cfg.seed)
    train_data = data.subset(tr)
    t0 = time.perf_counter()
    epoch_losses, step_losses = fit_regressor(model, tokenizer, train_data.texts, train_data.log_targets, cfg)
    seconds = time.perf_counter() - t0
    device = pick_device(cfg.device)
    val_problem_rmse = None
    if len(va):
        val = data.subset(va)
        pv = predict_log_batched(model, tokenizer, val.texts, cfg.max_length, cfg.eval_batch_size, device)
        log_sigma, source = query_rmse(val, pv), "validation"
        val_problem_rmse = float(np.sqrt(np.mean((val.log_targets - pv) ** 2)))
    else:
        pt = predict_log_batched(model, tokenizer, train_data.texts, cfg.max_length, cfg.eval_batch_size, device)
        log_sigma, source = query_rmse(train_data, pt), "train"
    meta = TrainingMetadata(
        backbone=str(backbone) if backbone is not None else "<given encoder>",
        seed=int(cfg.seed),
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        head_lr=float(cfg.head_lr),
        weight_decay=float(cfg.weight_decay),
        max_length=int(cfg.max_length),
        n_train=int(len(tr)),
        n_val=int(len(va)),
        log_sigma=float(log_sigma),
        log_sigma_source=source,
        val_problem_rmse=val_problem_rmse,
        final_train_loss=float(epoch_losses[-1]) if epoch_losses else None,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        train_seconds=float(seconds),
        extra={"target": "mean log(sample tokens) per problem", "warmup_fraction": cfg.warmup_fraction},
    )
    return TrainResult(model, tokenizer, meta, epoch_losses, step_losses)


class TransformerRegressor:
    """fit(texts, y) / predict_log(texts), the interface of the baselines, for cross-validation."""

    name = "transformer"

    def __init__(self, cfg: TrainConfig | None = None, build=None):
        self.cfg = cfg or TrainConfig()
        self._build = build  # optional () -> (model, tokenizer), e.g. a tiny encoder in tests
        self.model = None
        self.tokenizer = None

    def fit(self, texts: Sequence[str], y: np.ndarray) -> "TransformerRegressor":
        seed_everything(self.cfg.seed)
        if self._build is not None:
            self.model, self.tokenizer = self._build()
        else:
            self.model, self.tokenizer, _ = build_regressor(self.cfg.backbone, self.cfg.max_length)
        fit_regressor(self.model, self.tokenizer, list(texts), np.asarray(y, dtype=float), self.cfg)
        return self

    def predict_log(self, texts: Sequence[str]) -> np.ndarray:
        if self.model is None:
            raise InvalidInputError("model", None, "call fit() first")
        dev = pick_device(self.cfg.device)
        return predict_log_batched(self.model, self.tokenizer, list(texts), self.cfg.max_length, self.cfg.eval_batch_size, dev)
