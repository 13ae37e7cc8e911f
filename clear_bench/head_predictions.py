"""``--predictions head``: every problem of a pool predicted by a ridge head, as the deployment predicts it.

The head (the shipped one, or ``head:PATH``) reads the frozen encoder's
features of the problem's text (what the deployment's predictor reads of a
request: the prompt, or the last user message); its model is a
:class:`clear_core.length_model.LengthModel`, the same one serving prices
with, so a bench query is told exactly what a served request would be.

Encoding a pool takes minutes on a CPU, so the features are cached: one
``.npz`` per (pool file content, encoder, prompt length) under
``--features-cache`` (default ``$XDG_CACHE_HOME/clear-llm/features``, else
``~/.cache/clear-llm/features``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError
from clear_core.length_model import LengthModel


@dataclass(frozen=True)
class HeadModel:
    """A head file as the bench uses it: its model, the ridge strength it learns with, where it came from."""

    model: LengthModel
    alpha: float  # the head's ridge in the censored fit's units (clear_core.length_model.prior_alpha)
    source: str  # "shipped" or the file
    encoder: dict  # the head's encoder description (its cache key)
    max_length: int


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clear-llm" / "features"


def load_head_model(path: str | None) -> HeadModel:
    """The shipped head (``path`` None) or the head file at ``path``, as a :class:`HeadModel`."""
    from clear_predictor.head import load_head

    head = load_head(path)
    return HeadModel(head.length_model(), head.learning_alpha, "shipped" if path is None else str(path),
                     dict(head.encoder), int(head.max_length))


def pool_features(pool_path: str | Path, problems, head: HeadModel, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Each problem's encoder features, by problem id; encoded once per pool and encoder, then read from
    the cache (module docstring)."""
    digest = hashlib.sha256(Path(pool_path).read_bytes()).hexdigest()[:16]
    tag = f"{head.encoder.get('model', 'encoder')}-{head.max_length}".replace("/", "_")
    cache = (cache_dir or default_cache_dir()) / f"{Path(pool_path).stem}-{digest}-{tag}.npz"
    ids = [p.id for p in problems]
    if cache.is_file():
        got = np.load(cache, allow_pickle=False)
        if [str(i) for i in got["ids"]] == ids:
            return dict(zip(ids, np.asarray(got["features"], dtype=float)))
    from clear_predictor.features import FrozenEncoder

    encoder = FrozenEncoder(max_length=head.max_length)
    if encoder.hidden_size != head.model.coef.size:
        raise InvalidInputError("head", head.source, f"has {head.model.coef.size} weights, the encoder "
                                f"{encoder.hidden_size} features")
    t0 = time.perf_counter()
    feats = encoder.encode([p.problem for p in problems])
    print(f"encoded {len(ids)} prompts of {Path(pool_path).name} in {time.perf_counter() - t0:.0f} s "
          f"(cached in {cache})", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.array(ids), features=feats.astype(np.float32))
    tmp.replace(cache)
    return dict(zip(ids, feats.astype(np.float32).astype(float)))
