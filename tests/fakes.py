"""Fakes and reference answers that several test modules share.

Serving: stand-ins for the Ray handles the ingress calls (predictor, allocator, engine), requests as
Starlette builds them, and an ingress wired to them, so the serving code runs without Ray. Markets: a
bimodal length histogram and its value and cost curves. Best-of-k: one query scored the slow, obvious way.
A test module imports from here, never from another test module.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request

from clear_core.empirical_market import LOG_RATIO_GRID, LengthHistogram
from clear_core.online_market import Decision, DecisionReason
from deployments.config import AppConfig
from deployments.engines.base import EngineChunk
from deployments.messages import Prediction
from tests.factories import app_args

if TYPE_CHECKING:  # the ingress pulls in Ray Serve: the market tests that import this module need none of it
    from deployments.allocator import Allocator
    from deployments.ingress import Ingress

#: Tokens in each chunk a FakeEngine streams.
CHUNK_TOKENS = 3


# --- serving: fake handles --------------------------------------------------------------------------------


class RemoteCall:
    """What ``handle.method.remote(...)`` returns: awaitable, cancellable."""

    def __init__(self, value):
        self.value = value
        self.cancelled = False

    def __await__(self):
        async def get():
            return self.value

        return get().__await__()

    def cancel(self):
        self.cancelled = True


class RemoteMethod:
    """``handle.method``: ``.remote(*args)`` calls ``fn`` in this process."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakePredictor:
    def __init__(self):
        self.predict = RemoteMethod(lambda prompt: RemoteCall(Prediction(100.0, 0.5, "fake")))


class FakeAllocator:
    """Admits with ``cap`` tokens (or abandons) and records every settle."""

    def __init__(self, cap: int = 60, admit: bool = True):
        self.reserved: list[str] = []
        self.settled: list[tuple[str, int]] = []
        self.failed: list[bool] = []
        self.renewed: list[str] = []
        self.arrivals: list[tuple[str, bool]] = []
        self.tenants: list[str] = []
        self.entries: list[dict] = []  # how each request entered the market

        def reserve(rid, threshold, log_sigma, client_cap, owner, arrival_key, retry, runaway, tenant,
                    raw_threshold=None, group=1, floor_tokens=1):
            self.reserved.append(rid)
            self.entries.append({"threshold": threshold, "client_cap": client_cap, "group": group,
                                 "floor_tokens": floor_tokens})
            self.arrivals.append((arrival_key, retry))
            self.tenants.append(tenant)
            reason = DecisionReason.ADMITTED if admit else DecisionReason.INSOLVENT
            return RemoteCall(Decision(reason=reason, cap_tokens=min(cap, client_cap) if admit else 0,
                                       market_cap_tokens=cap, shadow_price=0.01, threshold_tokens=threshold,
                                       budget_per_query_tokens=256.0, retry_after_s=2.0))

        def settle(rid, generated, failed):
            self.settled.append((rid, generated))
            self.failed.append(failed)
            return RemoteCall(None)

        def renew(owner):
            self.renewed.append(owner)
            return RemoteCall(0)

        self.reserve = RemoteMethod(reserve)
        self.settle = RemoteMethod(settle)
        self.renew = RemoteMethod(renew)


class AllocatorHandle:
    """A real Allocator behind a handle with only what an ingress deciding locally calls: report (and status)."""

    def __init__(self, allocator: Allocator, up: bool = True):
        self.allocator, self.up, self.reports = allocator, up, 0

        def report(rep):
            self.reports += 1
            if not self.up:
                raise ConnectionError("allocator down")
            return self.allocator.report(rep)

        self.report = RemoteMethod(report)
        self.status = RemoteMethod(lambda: self.allocator.status())


class _Stream:
    def __init__(self, chunks: int, fail_after: int | None, gate: asyncio.Event | None):
        self.chunks, self.fail_after, self.gate = chunks, fail_after, gate
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for i in range(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("engine replica died")
            if self.gate is not None and i == 2:
                self.gate.set()  # two chunks are out: the test may disconnect now
                await asyncio.sleep(3600)
            yield EngineChunk(text="abc", tokens=CHUNK_TOKENS)
        yield EngineChunk(text="", tokens=0, finish_reason="length", info={"engine": "fake"})

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    """Streams ``chunks`` chunks of CHUNK_TOKENS tokens; fails before chunk ``fail_after``; with a ``gate``,
    sets it after two chunks and then hangs (the test disconnects)."""

    def __init__(self, chunks: int = 4, fail_after: int | None = None, gate: asyncio.Event | None = None):
        self.streams: list[_Stream] = []
        self.requests = []

        def generate(ereq):
            self.requests.append(ereq)
            s = _Stream(chunks, fail_after, gate)
            self.streams.append(s)
            return s

        self.generate = RemoteMethod(generate)

    def options(self, stream: bool):
        assert stream
        return self


class FakeLearner:
    """The length learner's handle: keeps the batches of records the ingress sends (deployments.learner)."""

    def __init__(self):
        self.records: list[dict] = []
        self.observe = RemoteMethod(self._observe)
        self.model = RemoteMethod(lambda known_version: RemoteCall(None))

    def _observe(self, records):
        self.records.extend(records)
        return RemoteCall(len(records))


def make_ingress(allocator=None, engine=None, learner=None, **ingress_cfg) -> Ingress:
    """An ingress on ``app_args(ingress=ingress_cfg)`` with a FakePredictor, no metrics; ``learner``: the
    length learner's handle (None: the service does not learn)."""
    from deployments.ingress import Ingress

    args = app_args(ingress=ingress_cfg) if ingress_cfg else app_args()
    args["predictor"]["placement"] = "deployment"  # the FakePredictor is its deployment's handle
    return Ingress(AppConfig.model_validate(args), FakePredictor(), allocator or FakeAllocator(),
                   engine or FakeEngine(), metrics=False, learner=learner)


# --- serving: requests ------------------------------------------------------------------------------------


def make_request(body: dict) -> Request:
    """A POST /v1/chat/completions whose JSON body arrives whole."""
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    return Request(scope, receive)


def request(raw: bytes | list[bytes], headers: dict | None = None, path="/v1/chat/completions", stall=False,
            delay_s: float = 0.0) -> Request:
    """A request whose body arrives as the given chunks (a list: chunked, no Content-Length), ``delay_s`` late."""
    chunks = list(raw) if isinstance(raw, list) else [raw]
    hdrs = {"content-type": "application/json", **(headers or {})}
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    if not isinstance(raw, list):
        hdrs.setdefault("content-length", str(len(raw)))
    sent = {"n": 0}

    async def receive():
        i = sent["n"]
        sent["n"] += 1
        if i == 0 and delay_s:
            await asyncio.sleep(delay_s)
        if stall and i >= len(chunks):
            await asyncio.sleep(3600)
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1 or stall}
        await asyncio.sleep(3600)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in hdrs.items() if v is not None]}
    req = Request(scope, receive)
    req.chunks_read = sent
    return req


def chat(stream: bool = False, **extra) -> dict:
    return {"model": "clear-replay", "messages": [{"role": "user", "content": "What is 2+2?"}], "stream": stream,
            **extra}


async def settle_tasks(ingress: Ingress) -> None:
    """Let the ingress's background settles run to the end."""
    for _ in range(5):
        await asyncio.sleep(0)
    if ingress._background:
        await asyncio.gather(*ingress._background)


# --- markets ----------------------------------------------------------------------------------------------


def bimodal(seed=0, n=400):
    """A bin whose queries answer briefly (and right) or run long (often wrong), some never finish."""
    rng = np.random.default_rng(seed)
    short = rng.random(n) < 0.4
    r = np.where(short, rng.normal(-1.0, 0.3, n), rng.normal(0.8, 0.4, n))
    correct = np.where(short, rng.random(n) < 0.9, rng.random(n) < 0.4)
    runaway = rng.random(n) < 0.1
    return LengthHistogram.fit(r, correct, runaway)


def curves(h):
    """Value and cost per unit prediction at every grid cap (index 0: cap 0), straight from the masses."""
    good, bad = np.asarray(h.correct), np.asarray(h.wrong)
    value = np.concatenate([[0.0], np.cumsum(good)])
    cost = [0.0]
    for g, u in enumerate(LOG_RATIO_GRID):
        done = (good[: g + 1] + bad[: g + 1])
        cost.append(float((done * np.exp(LOG_RATIO_GRID[: g + 1])).sum() + math.exp(u) * (1 - done.sum())))
    return value, np.array(cost)


# --- best-of-k --------------------------------------------------------------------------------------------


def brute(cap: int, toks: list[int], ok: list[bool], protocol: str, limit: int | None = None):
    """One query, written the slow, obvious way: (solved, generated, longest)."""
    limit = limit if limit is not None else 10**12
    if protocol == "parallel":
        per = min(cap // len(toks), limit)
        used = [min(per, t) for t in toks]
        solved = any(per > 0 and t <= per and c for t, c in zip(toks, ok))
        return solved, sum(used), max(used)
    left, gen, longest = cap, 0, 0
    for t, c in zip(toks, ok):
        if left <= 0:
            break
        run = min(left, limit, t)
        gen += run
        longest = max(longest, run)
        left -= run
        if t <= min(left + run, limit) and c:
            return True, gen, longest
    return False, gen, longest


# --- serving: Ray Serve LLM ------------------------------------------------------------------------------


class FakeStream:
    """What a handle call streams back: the given items, in order."""

    def __init__(self, items):
        self.items, self.cancelled = items, False

    def __aiter__(self):
        async def gen():
            for it in self.items:
                yield it

        return gen()

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def options(self, **kw):
        self.owner.options = kw
        return self

    def remote(self, request):
        self.owner.calls.append((self.name, request))
        return FakeStream(self.owner.items)


class FakeLLMHandle:
    """Stands in for the LLMServer handle: records requests, replays what Ray Serve LLM would yield."""

    def __init__(self, items=()):
        self.items, self.calls, self.options = list(items), [], None
        self.chat = FakeMethod(self, "chat")
        self.completions = FakeMethod(self, "completions")
