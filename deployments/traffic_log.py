"""The traffic log: what the service observed of each settled request, kept for the length learner.

A record (:class:`TrafficRecord`) says what the request was priced with (its prediction), what it got
(its cap per choice), what it generated and how it ended: by itself (its length is observed), at its cap
(only a lower bound), or cut short by its client or a failure (a lower bound too). Abandoned requests are
never generated and have no record. The prompt itself is kept only when the operator turns it on; a record
always carries its SHA-256.

The learner (:mod:`deployments.learner`) is the log's one writer: the ingress replicas send it their
records. Records are JSON Lines in *segments* under a directory or an fsspec URL (``/var/lib/clear/traffic``,
``s3://bucket/clear/traffic``, ``memory://``...). :meth:`TrafficLog.append` buffers records;
:meth:`TrafficLog.flush` writes the buffer as one new segment (one object written whole, which object
stores need: they do not append). A buffer is *due* once it holds ``segment_records`` records or its
oldest record waited ``flush_after_s``: ``append`` then flushes it, unless told not to (a server flushes
off its request path). Records buffered when a process dies are lost: at most a segment's worth. Segment names sort
by the time they were written. The log is bounded: once more than ``max_segments`` segments exist the
oldest are deleted. :meth:`TrafficLog.read` yields every record, oldest first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np

#: How a request ended: by itself, at its cap, its client gone, or a failure.
ENDINGS = ("natural", "cap", "client", "failed")


@dataclass(frozen=True)
class TrafficRecord:
    time: float  # when it settled (Unix time, s)
    request_id: str
    tenant: str
    model: str
    prompt_sha256: str
    prediction_source: str  # the predictor backend (a fallback says so)
    predicted_threshold_tokens: float  # the calibrated median it was priced with
    raw_threshold_tokens: float | None  # the head's raw prediction (its calibration bin), when it has one
    log_sigma: float
    runaway: float
    cap_tokens: int  # per choice
    tokens: int  # generated, all choices together
    ended: str  # one of ENDINGS
    choices: int = 1
    features: str | None = None  # the encoder's features (encode_features), when the predictor shares them
    prompt: str | None = None  # only when the log stores prompts
    model_version: int = 0  # the length model it was priced with (0: the head as shipped)
    explored: bool = False  # admitted at a probe cap (clear_core.exploration)

    @property
    def censored(self) -> bool:
        """The length is only known to be at least ``tokens`` (per choice: at least the cap, when capped)."""
        return self.ended != "natural"

    @staticmethod
    def prompt_hash(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


_FIELDS = {f.name for f in fields(TrafficRecord)}


def encode_features(x) -> str:
    """Encoder features as a record keeps them: little-endian float16, base64 (768 characters for 384 of
    them; float16 keeps 3 significant digits, about 1e-4 of a typical feature: far below what moves a
    prediction)."""
    return base64.b64encode(np.asarray(x, dtype="<f2").tobytes()).decode("ascii")


def decode_features(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float64)


class TrafficLog:
    """Bounded, rotated JSON Lines segments of :class:`TrafficRecord` under ``url`` (module docstring)."""

    def __init__(self, url: str, *, segment_records: int = 10_000, max_segments: int = 100,
                 store_prompts: bool = False, flush_after_s: float = 60.0, prefix: str = "traffic"):
        import fsspec

        if segment_records < 1 or max_segments < 1:
            raise ValueError("segment_records and max_segments must be >= 1")
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)
        self.segment_records = int(segment_records)
        self.max_segments = int(max_segments)
        self.store_prompts = bool(store_prompts)
        self.prefix = prefix
        self.flush_after_s = float(flush_after_s)
        self._buffer: list[str] = []
        self._oldest = 0.0  # when the oldest buffered record was appended (monotonic)
        self._writer = uuid.uuid4().hex[:8]  # several writers (ingress replicas) never name a segment alike
        self._seq = 0

    def append(self, record: TrafficRecord, flush: bool = True) -> bool:
        """Buffer ``record``; flush a due buffer when ``flush``. Whether a buffer is (still) due."""
        row = asdict(record)
        if not self.store_prompts:
            row["prompt"] = None
        if row["ended"] not in ENDINGS:
            raise ValueError(f"ended must be one of {ENDINGS}, got {row['ended']!r}")
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(json.dumps(row, separators=(",", ":")))
        if flush and self.due:
            self.flush()
        return self.due

    @property
    def due(self) -> bool:
        return bool(self._buffer) and (len(self._buffer) >= self.segment_records
                                       or time.monotonic() - self._oldest >= self.flush_after_s)

    def flush(self) -> str | None:
        """Write the buffered records as one new segment; its path (None: nothing buffered)."""
        if not self._buffer:
            return None
        lines, self._buffer = self._buffer, []
        self._seq += 1
        path = f"{self.root}/{self.prefix}-{time.time_ns():020d}-{self._writer}-{self._seq:06d}.jsonl"
        with self.fs.open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._bound()
        return path

    def segments(self) -> list[str]:
        """The segments written so far, oldest first."""
        found = self.fs.glob(f"{self.root}/{self.prefix}-*.jsonl")
        return sorted(found, key=lambda p: p.rsplit("/", 1)[-1])

    def _bound(self) -> None:
        old = self.segments()[: -self.max_segments]
        for path in old:
            self.fs.rm(path)

    def read(self) -> Iterator[TrafficRecord]:
        """Every record written (not the buffer), oldest segment first; a line of another format is skipped."""
        for path in self.segments():
            yield from self._records(path)

    def read_tail(self, n: int) -> list[TrafficRecord]:
        """The last ``n`` records written (or all there are), oldest first; reads only the newest segments."""
        tail: list[TrafficRecord] = []
        for path in reversed(self.segments()):
            if len(tail) >= n:
                break
            tail = list(self._records(path)) + tail
        return tail[-n:] if n > 0 else []

    def _records(self, path: str) -> Iterator[TrafficRecord]:
        try:
            f = self.fs.open(path, "r")
        except FileNotFoundError:  # removed by another writer's bound since it was listed
            return
        with f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and _FIELDS.issuperset(row) and "request_id" in row:
                    yield TrafficRecord(**row)
