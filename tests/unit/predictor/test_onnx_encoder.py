"""The encoder on ONNX Runtime (clear_predictor.onnx_encoder) gives the head torch's features: the shipped head
predicts the same log lengths from both, on real prompts of the main pool, short and long, truncated or not."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.errors import InvalidInputError
from clear_core.traces import load_pool
from clear_predictor.features import FrozenEncoder
from clear_predictor.head import load_head
from clear_predictor.head_predictor import HeadPredictor, make_encoder
from clear_predictor.onnx_encoder import OnnxEncoder

from predictor_helpers import MAIN_POOL

pytestmark = pytest.mark.slow  # the real MiniLM on both runtimes


@pytest.fixture(scope="module")
def prompts():
    texts = [p.problem for p in load_pool(MAIN_POOL)]
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.choice(len(texts), 48, replace=False)]
    return picked + ["", "x", "Let x be a real number. " * 400]  # empty, one token, cut to the last 256 tokens


def test_onnx_features_are_torchs_and_the_head_predicts_the_same(tmp_path, monkeypatch, prompts):
    monkeypatch.setenv("CLEAR_ONNX_CACHE", str(tmp_path))
    head = load_head()
    torch_features = FrozenEncoder(max_length=head.max_length).encode(prompts)
    built = OnnxEncoder(max_length=head.max_length)  # exports the graph into the empty cache
    assert built.graph.parent == tmp_path and built.graph.is_file()
    cached = OnnxEncoder(max_length=head.max_length)  # loads it: the same file, the same features
    assert cached.graph == built.graph
    one_by_one = np.array([cached.encode([p])[0] for p in prompts])
    batched = built.encode(prompts)
    for got in (one_by_one, batched):
        assert got.shape == torch_features.shape
        assert np.max(np.abs(got - torch_features)) < 1e-4
        assert np.max(np.abs(head.predict_log(got) - head.predict_log(torch_features))) < 1e-3


def test_the_head_predictor_runs_onnx_on_a_cpu_and_passes_its_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAR_ONNX_CACHE", str(tmp_path))
    predictor = HeadPredictor(device="cpu")  # auto: onnx on a CPU; the probe is checked at load
    assert isinstance(predictor.encoder, OnnxEncoder)
    assert predictor.encoder.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(InvalidInputError):
        make_encoder(256, runtime="tensorrt")
