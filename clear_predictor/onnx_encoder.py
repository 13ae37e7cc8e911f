"""The frozen encoder on ONNX Runtime: the same features as :class:`~clear_predictor.features.FrozenEncoder`,
at the speed a request path needs on a CPU.

The encoder and its mean pooling are exported once to an ONNX graph
(``torch.onnx.export``) and run by ONNX Runtime with its graph optimisations
on a fixed number of intra-op threads (one per replica by default: replicas,
not threads, scale a CPU service). The graph is not shipped: it is built at
start-up from the installed encoder's weights and cached under
``~/.cache/clear-llm/onnx`` (``CLEAR_ONNX_CACHE`` elsewhere), keyed by a hash
of the weights, the exporter's version and the pooling, so a new encoder or
torch builds a new graph and a second start-up loads the cached one.

Tokenisation, left truncation and length-bucketed batches are the torch
path's (:mod:`clear_predictor.batching`), so a head fitted on torch features
predicts the same from these: the features agree to float rounding (see
``tests/unit/predictor/test_onnx_encoder.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clear_predictor.batching import bucketed_batches, pad_token_id, tokenize
from clear_predictor.model import _offline, load_encoder, load_tokenizer, resolve_backbone

#: Format of the cached graph: bump when the export changes (inputs, outputs, pooling, opset).
GRAPH_FORMAT = "minilm-mean-pool/1"
OPSET = 17
#: Padded tokens per forward pass, as the torch path on a CPU.
MAX_BATCH_TOKENS = 1024
MAX_BATCH_ROWS = 64


def cache_dir() -> Path:
    return Path(os.environ.get("CLEAR_ONNX_CACHE") or Path.home() / ".cache" / "clear-llm" / "onnx")


def _weights_digest(backbone: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(backbone)):
        path = os.path.join(backbone, name)
        if os.path.isfile(path) and name.endswith((".safetensors", ".bin", "config.json")):
            digest.update(name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def export_graph(encoder, path: Path) -> Path:
    """Export ``encoder`` with masked mean pooling (``(input_ids, attention_mask) -> pooled``) to ``path``."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    example = torch.ones((1, 8), dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the exporter's tracer warnings (data-dependent branches in the masking code) are about shapes
            # the graph is then checked on: the features equal torch's (tests/unit/predictor/test_onnx_encoder.py)
            warnings.simplefilter("ignore")
            torch.onnx.export(Pooled(encoder.eval()), (example, example), tmp, input_names=["input_ids", "attention_mask"],
                              output_names=["pooled"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input_ids": {0: "rows", 1: "tokens"},
                                            "attention_mask": {0: "rows", 1: "tokens"}, "pooled": {0: "rows"}})
        os.replace(tmp, path)  # whole or not at all: another replica may be reading the cache
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxEncoder:
    """``encode(texts) -> (n, hidden)`` features of the bundled MiniLM (or ``backbone``) on ONNX Runtime."""

    def __init__(self, backbone: str | None = None, max_length: int = 256, threads: int = 1):
        import onnxruntime as ort
        import torch
        from transformers import AutoConfig

        _offline()
        self.backbone = resolve_backbone(backbone)
        self.tokenizer = load_tokenizer(self.backbone, max_length)
        self.max_length = int(max_length)
        self._hidden = int(AutoConfig.from_pretrained(self.backbone).hidden_size)
        self.pad = pad_token_id(self.tokenizer)
        key = f"{GRAPH_FORMAT}|{_weights_digest(self.backbone)}|torch {torch.__version__}|opset {OPSET}"
        self.graph = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.onnx"
        if not self.graph.exists():  # the torch weights are loaded only to export them
            export_graph(load_encoder(self.backbone, max_length)[0], self.graph)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(int(threads), 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
        self.session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])

    @property
    def hidden_size(self) -> int:
        return self._hidden

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, texts, self.max_length)
        feats = np.zeros((len(ids), self._hidden), dtype=np.float64)
        if not ids:
            return feats
        for idx in bucketed_batches([len(r) for r in ids], MAX_BATCH_ROWS, max_batch_tokens=MAX_BATCH_TOKENS):
            width = max(1, max(len(ids[i]) for i in idx))
            input_ids = np.full((len(idx), width), self.pad, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            feats[idx] = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        return feats


__all__ = ["OnnxEncoder", "export_graph", "cache_dir"]
