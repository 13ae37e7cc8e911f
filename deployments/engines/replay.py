"""Trace-replay engine: streams a recorded solution cut at the cap, at a GPU-like pace.

For the prompt's problem (see :mod:`.workload`) and the requested sample
(``EngineRequest.sample_index``, default 0) it generates
``min(cap, tokens)`` tokens, ``tokens`` being the sample's recorded length:

* text: the recorded ``response`` cut at the cap (exact Qwen2.5 tokens when a
  rank file is configured, the approximation of :mod:`deployments.tokens`
  otherwise). Only the first sample of a problem has a recorded text; other
  samples, synthetic problems, and recorded texts shorter than their count
  are completed with filler (`` step`` repeated, one token each), so the
  streamed text always has the reported number of tokens;
* ``finish_reason``: ``stop`` when the cap covers the recorded length and the
  recording itself was not truncated, else ``length``;
* ``info``: ``{problem_id, sample_index, solved, matched, synthetic, tokens}``
  with ``solved`` iff ``cap >= tokens and correct`` (the trace semantics), so
  load tests can score accuracy.

Pace: ``time_to_first_token_s``, then ``stream_chunk_tokens`` tokens every
``stream_chunk_tokens / decode_tokens_per_s`` seconds; at most
``max_concurrent_requests`` requests decode at once per replica (the rest wait,
as in a GPU engine's queue), so latency and autoscaling behave like a real
engine's.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from deployments.config import ReplayEngineConfig
from deployments.engines.base import Engine, EngineChunk, EngineRequest
from deployments.engines.workload import Workload, load_workload
from deployments.errors import EngineError
from deployments.tokens import TokenCodec


class ReplayEngine(Engine):
    def __init__(self, config: ReplayEngineConfig, model_name: str = "clear-replay"):
        self.config = config
        self.model_name = model_name
        self.workload: Workload = load_workload(*self.config.replayed_workload())
        self.codec = TokenCodec(self.config.tokenizer_path)
        self._slots = asyncio.Semaphore(self.config.advanced.max_concurrent_requests)

    def plan(self, request: EngineRequest) -> tuple[list[str], str, dict]:
        """The pieces to stream, the finish reason and the info of one request (no waiting)."""
        replay = self.workload.plan(request.prompt, request.sample_index)
        cap = int(request.cap_tokens)
        problem = replay.problem
        text = problem.response if (replay.sample_index == 0 and problem.response) else ""
        n, finish = replay.tokens_under(cap), replay.finish_reason(cap)
        if request.sampling.get("ignore_eos"):  # vLLM's ignore_eos: generation runs to the cap
            n, finish = cap, "length"
        least = min(int(request.sampling.get("min_tokens") or 0), cap)  # vLLM's min_tokens: no end before these
        if least > n:
            n, finish = least, "length" if least >= cap else "stop"
        return self.codec.cut(text, n), finish, replay.info(cap)

    def _should_fail(self, request_id: str) -> bool:
        p = self.config.advanced.fail_probability
        if p <= 0:
            return False
        seed = int.from_bytes(hashlib.sha1(request_id.encode()).digest()[:8], "big")
        return random.Random(seed).random() < p

    async def generate(self, request: EngineRequest):
        pieces, finish, info = self.plan(request)
        cfg = self.config
        step = cfg.advanced.stream_chunk_tokens
        delay = step / cfg.advanced.decode_tokens_per_s
        fail_at = len(pieces) // 2 if self._should_fail(request.request_id) else None
        async with self._slots:
            if cfg.advanced.time_to_first_token_s:
                await asyncio.sleep(cfg.advanced.time_to_first_token_s)
            for start in range(0, len(pieces), step):
                if fail_at is not None and start >= fail_at:
                    raise EngineError(f"replay engine: injected failure after {start} tokens")
                chunk = pieces[start : start + step]
                last = start + step >= len(pieces)
                if last:
                    yield EngineChunk(text="".join(chunk), tokens=len(chunk), finish_reason=finish, info=info)
                else:
                    yield EngineChunk(text="".join(chunk), tokens=len(chunk))
                    await asyncio.sleep(delay)
            if not pieces:  # cap 0 never reaches an engine, but a zero-length sample can
                yield EngineChunk(text="", tokens=0, finish_reason=finish, info=info)
