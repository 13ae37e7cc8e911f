"""Fixtures for the predictor tests (helpers live in predictor_helpers.py)."""

from __future__ import annotations

import pytest

from predictor_helpers import make_tiny_encoder, make_tiny_tokenizer


@pytest.fixture
def tiny_parts(tmp_path):
    """() -> (LengthRegressor, tokenizer) with a fresh tiny random encoder, max_length 64."""
    from clear_predictor.model import from_encoder

    tok = make_tiny_tokenizer(tmp_path / "tok")

    def build(seed: int = 0, max_length: int = 64):
        enc = make_tiny_encoder(len(tok), seed)
        return from_encoder(enc, tok, max_length), tok

    return build


@pytest.fixture
def tiny_backbone_dir(tmp_path):
    """A saved tiny backbone folder (encoder + tokenizer), usable as --backbone."""
    folder = tmp_path / "tiny-bert"
    tok = make_tiny_tokenizer(folder)
    enc = make_tiny_encoder(len(tok))
    enc.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
