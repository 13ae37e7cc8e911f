"""Drive an OpenAI-compatible endpoint with a planned stream; record every request.

Two arrival modes, both bounded in request count and wall time:

* ``concurrency``: a fixed number of clients, each sending its next request as
  soon as the previous one ends (a closed loop, like the digital twin);
* ``rate``: Poisson arrivals at a target rate (an open loop, what a public
  endpoint sees), with a cap on requests in flight so a stalled server cannot
  make the test unbounded.

Requests stream (SSE) so time to first token is measured; a 429 is recorded
as ``abandoned`` with the shadow price from its error body.

While the load runs, a background task polls ``GET /v1/clear/status`` every
``status_interval_s`` (the budget's books, the shadow price, the abandonment
rate: what no single response carries) into ``status_samples``, on the same
clock as the records (seconds since the test started); one poll before the
first request and one after the last. A target without that route (404) is
simply not polled further.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from clear_core.cli_args import UsageError
from load_tests.grading import solved as grade
from load_tests.traffic import PlannedRequest

SAMPLE_INDEX_FIELD = "clear_sample_index"


@dataclass
class RequestRecord:
    index: int
    problem_id: str
    tier: str
    status: str  # ok | abandoned | rejected | error | timeout
    http_status: int
    start_s: float  # since the test started
    ttft_s: float | None  # time to first content token
    latency_s: float  # end to end
    completion_tokens: int  # generated (usage)
    allocated_tokens: int | None  # the cap CLEAR gave (clear.allocated_tokens)
    predicted_threshold_tokens: float | None
    shadow_price: float | None
    finish_reason: str | None
    solved: bool
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def normalize_base_url(url: str) -> str:
    """The server's base URL without a trailing ``/`` or ``/v1`` (the driver adds ``/v1/...`` itself):
    ``http://host:8000/v1/`` and ``http://host:8000`` name the same server, not ``/v1/v1/models``."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    return url


class TargetError(UsageError):
    """A target that cannot be load-tested (unreachable, or not an OpenAI server at that URL): a usage error,
    so a command line run through ``clear_core.cli_args.run_command`` prints it as one line."""


@dataclass(frozen=True)
class ServerInfo:
    model: str  # the first model of GET /v1/models
    replay: dict | None  # the pool a CLEAR replay server says it replays (problems, synthetic, fingerprint)


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1 prefix is added; a trailing /v1 is dropped)
    model: str | None = None  # None: the first of GET /v1/models
    mode: str = "concurrency"  # concurrency | rate
    concurrency: int = 32  # clients (concurrency mode) / max in flight (rate mode)
    rate_rps: float = 10.0  # Poisson arrival rate (rate mode)
    max_requests: int = 500
    max_duration_s: float = 600.0  # no new request after this; in-flight ones get request_timeout_s
    request_timeout_s: float = 120.0
    max_tokens: int | None = None  # client cap sent with every request (None: let CLEAR decide)
    api_key: str | None = None
    replay_samples: bool = True  # name the recorded sample (replay engine)
    seed: int = 0
    status_interval_s: float | None = 1.0  # poll /v1/clear/status this often (None or 0: never)


STATUS_PATH = "/v1/clear/status"
STATUS_TIMEOUT_S = 10.0


async def _poll_status_once(client: httpx.AsyncClient, cfg: LoadConfig, t0: float, sink: list[dict]) -> bool:
    """One sample of the allocator's status into ``sink``; False when the target has no status route."""
    sent = time.perf_counter()
    try:
        r = await client.get(f"{cfg.base_url}{STATUS_PATH}", timeout=min(cfg.request_timeout_s, STATUS_TIMEOUT_S))
        got = time.perf_counter()
        if r.status_code == 404:
            return False
        body = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # a missed sample, not a failed load test
        return True
    if isinstance(body, dict):
        # the snapshot was taken somewhere between sending and receiving: stamp the midpoint
        sink.append({"t_s": (sent + got) / 2 - t0, "rtt_s": got - sent, **body})
    return True


async def _poll_status(client: httpx.AsyncClient, cfg: LoadConfig, t0: float, sink: list[dict],
                       stop: asyncio.Event) -> None:
    """Poll every ``cfg.status_interval_s`` until ``stop``, then once more (the books after the last request)."""
    while not stop.is_set():
        if not await _poll_status_once(client, cfg, t0, sink):
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=cfg.status_interval_s)
        except asyncio.TimeoutError:
            pass
    await _poll_status_once(client, cfg, t0, sink)

    def __post_init__(self):
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))


async def probe(client: httpx.AsyncClient, base: str) -> ServerInfo:
    """``GET /v1/models``: the model to ask for and the replayed pool, or a :class:`TargetError`."""
    url = f"{normalize_base_url(base)}/v1/models"
    try:
        r = await client.get(url)
    except httpx.HTTPError as exc:
        raise TargetError(f"cannot reach {url}: {type(exc).__name__}: {str(exc) or 'no answer'}") from None
    if r.status_code != 200:
        hint = "a valid --api-key is needed" if r.status_code == 401 else "is that the server's base URL?"
        raise TargetError(f"{url} answered HTTP {r.status_code} ({hint})")
    try:
        model = r.json()["data"][0]
        return ServerInfo(model=str(model["id"]), replay=(model.get("clear") or {}).get("replay"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TargetError(f"{url} is not an OpenAI model list (no data[0].id)") from None


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, model: str, req: PlannedRequest, t0: float) -> RequestRecord:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": req.prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.max_tokens is not None:
        body["max_tokens"] = cfg.max_tokens
    if cfg.replay_samples:
        body[SAMPLE_INDEX_FIELD] = req.sample_index
    start = time.perf_counter()
    rec = RequestRecord(req.index, req.problem_id, req.tier, "error", 0, start - t0, None, 0.0, 0, None, None, None,
                        None, False)
    text: list[str] = []
    clear: dict = {}
    try:
        async with client.stream("POST", f"{cfg.base_url}/v1/chat/completions", json=body,
                                 timeout=cfg.request_timeout_s) as resp:
            rec.http_status = resp.status_code
            if resp.status_code != 200:
                payload = json.loads(await resp.aread() or b"{}")
                err = payload.get("error", {}) if isinstance(payload, dict) else {}
                rec.status = "abandoned" if resp.status_code == 429 else ("rejected" if resp.status_code < 500 else "error")
                rec.shadow_price = err.get("shadow_price")
                rec.predicted_threshold_tokens = err.get("predicted_threshold_tokens")
                rec.error = err.get("type") or str(resp.status_code)
                rec.latency_s = time.perf_counter() - start
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.status, rec.error = "error", chunk["error"].get("type", "stream_error")
                    break
                if isinstance(chunk.get("clear"), dict):
                    clear.update(chunk["clear"])
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if rec.ttft_s is None:
                            rec.ttft_s = time.perf_counter() - start
                        text.append(piece)
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    rec.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            if rec.error is None:
                rec.status = "ok"
    except httpx.TimeoutException:
        rec.status, rec.error = "timeout", "timeout"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.status, rec.error = "error", type(exc).__name__
    rec.latency_s = time.perf_counter() - start
    rec.allocated_tokens = clear.get("allocated_tokens")
    rec.predicted_threshold_tokens = clear.get("predicted_threshold_tokens", rec.predicted_threshold_tokens)
    rec.shadow_price = clear.get("shadow_price", rec.shadow_price)
    rec.solved = rec.status == "ok" and grade(clear, "".join(text), req.answer)
    return rec


async def run_load(
    cfg: LoadConfig,
    plan: list[PlannedRequest],
    progress: Callable[[RequestRecord], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    status_samples: list[dict] | None = None,
) -> list[RequestRecord]:
    """Send ``plan`` (at most ``max_requests`` of it) and return one record per request sent.

    ``status_samples``: a list the status polls are appended to (see the module's
    docstring); None, or ``cfg.status_interval_s`` unset, polls nothing.
    ``transport`` lets tests drive an in-process ASGI app instead of a socket.
    """
    if cfg.mode not in ("concurrency", "rate"):
        raise ValueError(f"unknown mode {cfg.mode!r}: expected 'concurrency' or 'rate'")
    plan = plan[: cfg.max_requests]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=cfg.request_timeout_s,
                                 transport=transport) as client:
        model = cfg.model or (await probe(client, cfg.base_url)).model
        t0 = time.perf_counter()
        deadline = t0 + cfg.max_duration_s
        stop_polling = asyncio.Event()
        poller = None
        if status_samples is not None and cfg.status_interval_s:
            poller = asyncio.create_task(_poll_status(client, cfg, t0, status_samples, stop_polling))

        async def send(req: PlannedRequest) -> None:
            rec = await _one(client, cfg, model, req, t0)
            records.append(rec)
            if progress is not None:
                progress(rec)

        try:
            if cfg.mode == "concurrency":
                queue: asyncio.Queue[PlannedRequest] = asyncio.Queue()
                for r in plan:
                    queue.put_nowait(r)

                async def worker() -> None:
                    while time.perf_counter() < deadline:
                        try:
                            req = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        await send(req)

                await asyncio.gather(*(worker() for _ in range(max(1, cfg.concurrency))))
            else:  # rate
                rng = random.Random(cfg.seed)
                in_flight = asyncio.Semaphore(max(1, cfg.concurrency))
                tasks = []

                async def guarded(req: PlannedRequest) -> None:
                    async with in_flight:
                        await send(req)

                for req in plan:
                    if time.perf_counter() >= deadline:
                        break
                    tasks.append(asyncio.create_task(guarded(req)))
                    await asyncio.sleep(rng.expovariate(cfg.rate_rps))
                await asyncio.gather(*tasks)
        except BaseException:
            if poller is not None:
                poller.cancel()
            raise
        if poller is not None:
            stop_polling.set()
            await poller
    records.sort(key=lambda r: r.index)
    return records
