"""Ingress: the OpenAI-compatible HTTP front end (FastAPI through ``@serve.ingress``).

Request path of a completion::

    auth (401) -> read the body (408/413, deployments.http_body) -> parse + validate (4xx, every
    check, the replay sample included) -> predict tau_hat (fallback on error or timeout)
    -> allocator.reserve (429 budget_abandoned | budget_pool_empty) -> engine with
    max_tokens = min(client, CLEAR cap) -> settle the reservation (always, in a finally)

Nothing touches the budget before every input check has passed. Once a
reservation may exist it is settled exactly once, whatever happens, with what
the client received:

* success: the tokens generated;
* an error answered to the client (engine error, dead engine replica): the
  tokens the client received (a whole answer that fails: none), as a *failed*
  settle, so the rest of the cap returns to the pool whatever the budget mode;
* the allocator failed during the reserve (503): the reservation may or may
  not exist, so it is released (a failed settle of 0 tokens);
* a client that leaves: a stream is cancelled and charged the tokens sent; a
  whole answer never sent is charged nothing.

Settles are retried until the allocator acknowledges them (it may be
restarting); they are idempotent there. Each ingress replica holds a lease at
the allocator, renewed in the background, and tags its reservations with it:
if the replica dies, its reservations are recovered a lease later, charged
nothing, instead of waiting for the reservation TTL.

A retried request (``Idempotency-Key``, or the ``openai`` client's
``x-stainless-retry-count``) is the same arrival for the market and the
budget: it carries an arrival key (the idempotency key, else a fingerprint of
the client's key and the body). Abandonments answer ``Retry-After`` and
``x-should-retry`` from the market's advice.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/clear/status``, ``/openapi.json`` and ``/docs`` need the API key when
keys are configured; ``/health`` never does. Every error, 404 and 500
included, is an OpenAI-style JSON body; no redirect is ever built from the
request's headers.
"""


import asyncio
import contextvars
import hashlib
import hmac
import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clear_core.online_market import DEFAULT_TENANT
from deployments.background import cancel_on_stop, stop_if_cancelled
from deployments.config import AppConfig
from deployments.engines import engine_client
from deployments.engines.base import EngineRequest
from deployments.errors import (
    AllocatorUnavailableError,
    RequestTooLargeError,
    AuthenticationError,
    BadRequestError,
    NotImplementedByEngineError,
    ClearError,
    ContextLengthError,
    EngineError,
    InternalServerError,
    MethodNotAllowedError,
    ModelNotFoundError,
    RouteNotFoundError,
    abandonment_error,
    outcome_of,
)
from deployments.http_body import SlowReaderGate, read_body
from deployments.market_entry import MarketEntry
from deployments.messages import Decision, DecisionReason, Prediction
from deployments.openai_schema import (
    SSE_DONE,
    ParsedRequest,
    completion_body,
    decode_body,
    error_body,
    parse_chat,
    parse_completion,
    retry_headers,
    sse_chunk,
    sse_error,
)
from deployments.engines.workload import Workload, load_workload
from deployments.passthrough import StreamRelay, refusal_in, whole_answer
from deployments.learner_client import ObservationSender
from deployments.traffic_log import TrafficRecord, encode_features
from deployments.vllm_protocol import parse_vllm
from deployments.predictor_backends import heuristic_prediction
from deployments.tokens import TokenCodec

logger = logging.getLogger("ray.serve")

# No built-in docs routes (they would bypass the API key; the class serves them behind it) and no
# trailing-slash redirects (Starlette builds their Location from the request's Host header).
app = FastAPI(title="CLEAR", description="Token-budget allocation with a shadow price (OpenAI-compatible API)",
              docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

#: Settles are retried until acknowledged, with this backoff (s), for at most SETTLE_RETRY_FOR_S.
#: A tenant name from the X-Clear-Tenant header (it becomes a metric label).
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
SETTLE_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
SETTLE_RETRY_FOR_S = 900.0
#: How long the status endpoint waits for the learner's part, s.
LEARNER_STATUS_S = 2.0
#: The engine's finish reason of a completion its cap cut (any other ended it by itself: ``stopped_by``).
CAP_STOP = "length"


def _error_response(exc: ClearError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=retry_headers(exc))


@app.exception_handler(ClearError)
async def _clear_error(request: Request, exc: ClearError):
    return _error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 405:
        return _error_response(MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}"))
    if exc.status_code == 404:
        return _error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))
    return JSONResponse({"error": {"message": str(exc.detail), "type": "http_error", "param": None,
                                   "code": exc.status_code}}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error_response(BadRequestError("the request is malformed"))


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(InternalServerError("internal server error (the details are in the server log)"))


def _engine_failure(exc: BaseException) -> ClearError:
    """A clean client error for whatever the engine raised: never a traceback, a path or an address.

    An error raised in a remote deployment arrives wrapped by Ray, its message
    a traceback; the project's own error inside (``.cause``) is answered bare,
    anything else becomes an :class:`EngineError` naming only its type.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ClearError):
        return cause
    if isinstance(exc, ClearError) and not isinstance(exc, RayError):
        return exc
    return EngineError(f"the engine failed ({type(cause or exc).__name__}); the request is charged only the "
                       "tokens it received")


async def _awaited(response):
    """A Serve response as a coroutine (what ``asyncio.wait_for`` takes)."""
    return await response


class Ingress:
    def __init__(self, config: AppConfig, predictor, allocator, engine, metrics: bool = True, learner=None):
        self.config = config
        self.predictor = predictor
        self._local_predictor = None
        if config.predictor.placement == "ingress":  # the backend in this replica: no round trip
            from deployments.predictor import Predictor

            self._local_predictor = Predictor(config.predictor, learner, config.learner.advanced.poll_s)
        self.allocator = allocator
        self.codec = TokenCodec(self.config.engine.token_counter_path())
        self._keys = [k.encode() for k in self.config.ingress.api_keys]
        self._background: set[asyncio.Task] = set()
        self.workload: Workload | None = self._workload(config.engine)
        self.engine = engine_client(config.engine, engine, config.model_name, self.workload)
        # vLLM: the client's own request is forwarded and vLLM's answer relayed (deployments.passthrough).
        self.passthrough = config.engine.kind == "vllm"
        self.slow_readers = SlowReaderGate(config.ingress.slow_reader_limit)
        # What the service observes of each settled request, sent to the length learner (deployments.learner).
        self.learner = learner
        self.observations = None if learner is None else ObservationSender(learner)
        self._seen: dict[str, dict] = {}  # request id -> what its record needs, until it settles
        # This replica's lease at the allocator: its reservations are recovered if it dies.
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        self._lease_task: asyncio.Task | None = None
        # decisions: ingress: this replica prices from a quote and reserves against a budget lease.
        self.leases = None
        if config.allocator.decisions == "ingress":
            from deployments.lease_client import LeaseClient

            self.leases = LeaseClient(config, allocator, config.allocator.to_budget().refund_unused, learner)
        self.metrics = None
        if metrics:
            from deployments.metrics import IngressMetrics

            self.metrics = IngressMetrics()

    @staticmethod
    def _workload(ecfg) -> Workload | None:
        """The replayed workload, so a bad ``clear_sample_index`` is refused before the budget is touched."""
        replayed = ecfg.replayed_workload()
        return None if replayed is None else load_workload(*replayed)

    # -- routes ----------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """Liveness of this ingress replica (no key needed, says nothing about the budget)."""
        return {"status": "ok"}

    @app.get("/openapi.json")
    async def openapi(self, request: Request):
        self._auth(request)  # a ClearError is answered by _clear_error
        return app.openapi()

    @app.get("/docs")
    async def docs(self, request: Request):
        self._auth(request)
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json", title="CLEAR")

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        # vLLM's model card: `root` and `max_model_len` (what vLLM's benchmark client reads) beside OpenAI's fields.
        model = {"id": self.config.model_name, "object": "model", "created": int(time.time()), "owned_by": "clear",
                 "root": getattr(self.config.engine, "model_source", self.config.model_name),
                 "max_model_len": self.config.context_limit_tokens}
        if self.workload is not None:  # the replayed pool, so a load test can check it draws from the same one
            model["clear"] = {"replay": self.workload.describe()}
        return {"object": "list", "data": [model]}

    @app.get("/v1/clear/status")
    async def status(self, request: Request):
        self._auth(request)
        if self.leases is not None:  # report first: the books then hold every decision of this replica
            await self.leases.sync()
        status = await self.allocator.status.remote()
        if self.leases is not None:  # this replica's lease and the age of the prices it decides with
            status["ingress"] = {**self.leases.status(), "length_model_version": self.leases.model_version}
        if self.learner is not None:  # what the length learner has seen and the model it published
            try:
                status["learner"] = await asyncio.wait_for(_awaited(self.learner.status.remote()), LEARNER_STATUS_S)
            except Exception as exc:
                status["learner"] = {"error": f"the learner did not answer ({type(exc).__name__})"}
            if self.observations is not None:
                status["learner"]["records_sent_by_this_replica"] = self.observations.sent
                status["learner"]["records_dropped_by_this_replica"] = self.observations.dropped
        return status

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: the model's token ids of a prompt (or of chat messages, on the vLLM engine)."""
        body = await self._utility_body(request)
        if hasattr(self.engine, "tokenize"):
            return await self.engine.tokenize(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequestError("'prompt' is required and must be a string", param="prompt")
        ids = self._token_ids().encode_ordinary(prompt)
        return {"count": len(ids), "max_model_len": self.config.context_limit_tokens, "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's /detokenize: the text of token ids."""
        body = await self._utility_body(request)
        if hasattr(self.engine, "detokenize"):
            return await self.engine.detokenize(body)
        tokens = body.get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in tokens)):
            raise BadRequestError("'tokens' must be a list of token ids (integers >= 0)", param="tokens")
        enc = self._token_ids()
        if any(t >= enc.n_vocab for t in tokens):
            raise BadRequestError(f"'tokens' holds an id outside the vocabulary of {enc.n_vocab}", param="tokens")
        return {"prompt": enc.decode(tokens)}

    async def _utility_body(self, request: Request) -> dict:
        self._auth(request)
        raw = await read_body(request.receive, max_bytes=self.config.ingress.advanced.max_request_body_bytes,
                              timeout_s=self.config.ingress.advanced.body_read_timeout_s,
                              fast_s=self.config.ingress.advanced.slow_body_after_s, gate=self.slow_readers)
        body = decode_body(raw, request.headers.get("content-type"))
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise ModelNotFoundError(f"model {model!r} does not exist; this server serves {self.config.model_name!r}")
        return body

    def _token_ids(self):
        """The replay engine's tokenizer, when it has one (engine.tokenizer_path)."""
        if self.codec.encoding is None:
            raise NotImplementedByEngineError("token ids need the replay engine's tokenizer (engine.tokenizer_path); "
                                              "without it the replay counts tokens approximately")
        return self.codec.encoding

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, "completion")

    # -- the request path ----------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k) for k in self._keys):
            raise AuthenticationError("a valid API key is required (Authorization: Bearer <key>)")

    async def _read(self, request: Request, kind: str) -> tuple[ParsedRequest, bytes]:
        """The parsed, validated request and its raw body (every check that needs no budget)."""
        icfg = self.config.ingress
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > icfg.advanced.max_request_body_bytes:
            raise RequestTooLargeError(f"request body of {size} bytes exceeds {icfg.advanced.max_request_body_bytes}")
        raw = await read_body(request.receive, max_bytes=icfg.advanced.max_request_body_bytes, timeout_s=icfg.advanced.body_read_timeout_s,
                              fast_s=icfg.advanced.slow_body_after_s, gate=self.slow_readers)
        body = decode_body(raw, request.headers.get("content-type"))
        limit = self.config.context_limit_tokens
        if self.passthrough:  # the whole OpenAI and vLLM request, checked by vLLM's own models
            req = parse_vllm(kind, body, limit)
        else:
            req = parse_chat(body, limit) if kind == "chat" else parse_completion(body, limit)
        if req.model != self.config.model_name:
            raise ModelNotFoundError(f"model {req.model!r} does not exist; this server serves {self.config.model_name!r}")
        if self.workload is not None:
            self.workload.plan(req.prompt, req.sample_index)  # 400 for a sample the problem does not have
            if req.n > 1:
                raise BadRequestError("'n' > 1 cannot replay one recorded sample; send one request per choice",
                                      param="n")
        elif req.sample_index is not None:
            raise BadRequestError("clear_sample_index needs an engine that replays traces (engine.advanced.replay)",
                                  param="clear_sample_index")
        return req, raw

    def _tenant(self, request: Request) -> str:
        """Whose request this is: its API key's tenant, else the X-Clear-Tenant header (keys off), else default."""
        if self._keys:
            token = request.headers.get("authorization", "").partition(" ")[2].strip()
            named = self.config.ingress.api_key_tenants.get(token)
            return named or "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        name = request.headers.get("x-clear-tenant")
        if name is None:
            return DEFAULT_TENANT
        if not _TENANT_NAME.fullmatch(name):
            raise BadRequestError("X-Clear-Tenant must be 1-64 letters, digits, '.', '_' or '-'", param="X-Clear-Tenant")
        return name

    def _arrival(self, request: Request, raw: bytes) -> tuple[str, bool]:
        """(arrival key, is a retry): the client's Idempotency-Key, else a fingerprint of its key and body."""
        idem = request.headers.get("idempotency-key")
        retries = request.headers.get("x-stainless-retry-count", "0")
        retry = idem is not None or (retries.isdigit() and int(retries) > 0)
        principal = request.headers.get("authorization", "")
        if idem is not None:
            return "idem:" + hashlib.sha256(f"{principal}\n{idem}".encode()).hexdigest()[:32], retry
        return "body:" + hashlib.sha256(principal.encode() + b"\n" + raw).hexdigest()[:32], retry

    def _completion_limit(self, req: ParsedRequest) -> tuple[int, int]:
        """(prompt tokens, most completion tokens the context allows)."""
        prompt_tokens = self.codec.count(req.count_text)
        room = self.config.context_limit_tokens - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; the context limit is {self.config.context_limit_tokens}",
                param="messages" if req.kind == "chat" else "prompt",
            )
        if req.max_tokens is not None and req.max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={req.max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the context limit "
                f"{self.config.context_limit_tokens}",
                param="max_tokens",
            )
        return prompt_tokens, room

    async def _predict(self, prompt: str) -> Prediction:
        t0 = time.perf_counter()
        if self._local_predictor is not None:
            try:
                return await self._local_predictor.predict(prompt)  # batched with the prompts waiting; falls back
            finally:
                if self.metrics:
                    self.metrics.prediction.observe(time.perf_counter() - t0)
        try:
            resp = self.predictor.predict.remote(prompt)
            try:
                pred = await asyncio.wait_for(_await(resp), timeout=self.config.predictor.advanced.timeout_s)
            except asyncio.TimeoutError:
                _cancel(resp)
                self._count_fallback("timeout")
                return heuristic_prediction(prompt, "timeout")
            if not isinstance(pred, Prediction):
                raise TypeError(f"the predictor answered {type(pred).__name__}, not a Prediction")
            return pred  # may itself be a fallback the predictor counted (lookup_miss, error)
        except Exception:
            logger.exception("predictor call failed; using the heuristic")
            self._count_fallback("error")
            return heuristic_prediction(prompt, "error")
        finally:
            if self.metrics:
                self.metrics.prediction.observe(time.perf_counter() - t0)

    def _count_fallback(self, reason: str) -> None:
        if self.metrics:
            self.metrics.fallback(reason)

    def _count(self, outcome: str, error_type: str = "") -> None:
        if self.metrics:
            self.metrics.request(outcome, error_type)

    async def _complete(self, request: Request, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            self._auth(request)
            req, raw = await self._read(request, kind)
            prompt_tokens, room = self._completion_limit(req)
            entry = await self._entry(req, min(req.max_tokens or room, room))
            arrival_key, retry = self._arrival(request, raw)
            tenant = self._tenant(request)
            t0 = time.perf_counter()
            pred = await self._predict(req.prompt)
            t1 = time.perf_counter()
            priced = entry.priced(pred)
            if self.leases is not None:
                decision = await self.leases.decide(rid, priced, entry.group_client_cap_tokens, arrival_key, retry,
                                                    tenant, entry.n, entry.group_floor_tokens)
                t2 = time.perf_counter()
                if not decision.admitted:
                    raise abandonment_error(decision, pred.threshold_tokens)
            else:
                decision, t2 = await self._reserve(rid, pred, entry, arrival_key, retry, tenant)
            cap = entry.per_choice(decision.cap_tokens)
            if self.observations is not None:  # what the learner is told when the request settles
                self._seen[rid] = {"tenant": tenant, "model": req.model, "prompt": req.prompt, "pred": pred,
                                   "cap": cap, "choices": entry.n,
                                   "explored": decision.reason is DecisionReason.EXPLORED}
            if req.min_tokens > cap:  # the engine would refuse it: refunded whole, nothing generated
                self._settle(rid, 0, failed=True)
                raise BadRequestError(f"'min_tokens' ({req.min_tokens}) is above the cap CLEAR gives this request "
                                      f"now ({cap} tokens); nothing was charged", param="min_tokens")
        except ClearError as exc:
            self._count(outcome_of(exc), exc.error_type)
            return _error_response(exc)

        clear = {
            "allocated_tokens": decision.cap_tokens,
            "predicted_threshold_tokens": pred.threshold_tokens,
            "shadow_price": decision.shadow_price,
            "policy": self.config.allocator.policy,
            "market_cap_tokens": decision.market_cap_tokens,
            "decision": decision.reason.value,
            "client_max_tokens": req.max_tokens,
            "prediction_source": pred.source,
            "length_model_version": int(getattr(pred, "model_version", 0)),
            "retry_of_recent_arrival": not decision.new_arrival,
            # Time this request spent in the predictor and the allocator (the CLEAR overhead), ms.
            "timing_ms": {"predict": 1e3 * (t1 - t0), "allocate": 1e3 * (t2 - t1)},
        }
        if entry.n > 1:
            clear["choices"], clear["cap_per_choice_tokens"] = entry.n, cap
        thinking = entry.thinking_budget(decision.cap_tokens)
        if thinking is not None:
            clear["thinking_budget_tokens"], clear["answer_tokens"] = thinking, entry.answer_tokens
        cut = _cut_by(req.max_tokens, cap, entry.per_choice(decision.market_cap_tokens), room)
        if self.passthrough:
            return await self._relay(req, rid, cap, thinking, clear, cut)
        ereq = EngineRequest(
            request_id=rid, kind=kind, prompt=req.prompt, messages=req.messages, cap_tokens=cap,
            model=req.model, sample_index=req.sample_index, sampling=req.sampling, stream=req.stream,
        )
        if req.stream:
            return StreamingResponse(self._sse(req, rid, ereq, prompt_tokens, clear, cut),
                                     media_type="text/event-stream")
        return await self._whole(req, rid, ereq, prompt_tokens, clear, cut)

    async def _entry(self, req, client_cap: int) -> MarketEntry:
        """How the request enters the market (deployments.market_entry): choices, answer allowance, floor."""
        reasoning = self.passthrough and await self.engine.reasoning()
        if not reasoning and getattr(req, "thinking_token_budget", None) is not None:
            raise BadRequestError("'thinking_token_budget' needs a reasoning engine (a reasoning_parser in "
                                  "engine.llm_config.engine_kwargs); this one has none", param="thinking_token_budget")
        return MarketEntry.of(req, client_cap, reasoning=reasoning, answer_tokens=getattr(
            self.config.engine, "answer_tokens", 0), structured_floor_tokens=self.config.allocator.advanced.structured_floor_tokens)

    async def _reserve(self, rid, pred, entry: MarketEntry, arrival_key, retry, tenant) -> tuple[Decision, float]:
        """Central decisions: the allocator prices the request's entry and reserves (one round trip); raises an
        abandonment (its threshold ``pred``'s, one choice's)."""
        self._ensure_lease()
        priced = entry.priced(pred)
        try:
            decision: Decision = await self.allocator.reserve.remote(
                rid, priced.threshold_tokens, priced.log_sigma, entry.group_client_cap_tokens, self.owner,
                arrival_key, retry, float(getattr(priced, "runaway", 0.0)), tenant,
                getattr(priced, "raw_threshold_tokens", None), entry.n, entry.group_floor_tokens,
            )
        except ClearError:
            raise
        except Exception as exc:
            # The reservation may exist (the allocator died after writing it): release it.
            self._settle(rid, 0, failed=True)
            logger.warning("reserve of %s failed: %s", rid, type(exc).__name__)
            raise AllocatorUnavailableError("the allocator is unavailable (restarting); nothing was charged, "
                                            "retry shortly") from None
        if not decision.admitted:
            raise abandonment_error(decision, pred.threshold_tokens)
        return decision, time.perf_counter()

    async def _engine_stream(self, ereq: EngineRequest, tally: dict):
        """Engine chunks; ``tally`` keeps the tokens received, the finish reason and info."""
        gen = self.engine.generate(ereq)
        try:
            async for chunk in gen:
                tally["tokens"] += chunk.tokens
                if chunk.finish_reason is not None:
                    tally["finish"] = chunk.finish_reason
                    tally["info"] = chunk.info
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            await gen.aclose()  # cancels the engine's remote stream
            raise
        except Exception as exc:
            failure = _engine_failure(exc)
            # One line, never the remote traceback a Ray error carries; a client's own error (4xx) is
            # not the server's fault: debug only.
            logger.log(logging.DEBUG if failure.http_status < 500 else logging.WARNING, "engine failed on %s: %s: %s",
                       ereq.request_id, type(getattr(exc, "cause", None) or exc).__name__, failure)
            raise failure from None

    # -- settling, and this replica's lease ------------------------------------------

    def _background_task(self, coro) -> asyncio.Task:
        """Run ``coro`` in a task of its own, outside the request's context.

        The task runs in an empty ``contextvars.Context``: Serve tracks the
        handle calls made inside a request's context as its children and
        cancels them when the request is cancelled (a client disconnect), which
        would cancel this very settle and leak the reservation.
        """
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _settle(self, rid: str, tokens: int, failed: bool = False, ended: str | None = None) -> asyncio.Task | None:
        """Settle ``rid`` in the background, retried until the allocator acknowledges it (idempotent there).

        Decisions at the ingress settle in this replica's lease at once (None: nothing to wait for).
        ``ended``: how the request ended, for the traffic log (None: nothing was generated, no record).
        """
        self._observe(rid, tokens, ended)
        if self.leases is not None:
            self.leases.settle(rid, tokens, failed)
            return None

        return self._background_task(_until_acknowledged(
            lambda: self.allocator.settle.remote(rid, int(tokens), failed),
            f"settle of {rid}", "its lease or TTL will end it"))

    async def _settle_acknowledged(self, rid: str, tokens: int, ended: str) -> None:
        """Settle, and wait up to ``ingress.advanced.settle_ack_wait_s`` for the allocator's acknowledgement
        before the answer ends, so a replica that dies right after answering cannot lose the settle."""
        task = self._settle(rid, tokens, ended=ended)
        if task is not None and self.config.ingress.advanced.settle_ack_wait_s > 0:
            try:
                await asyncio.wait({task}, timeout=self.config.ingress.advanced.settle_ack_wait_s)
            except asyncio.CancelledError:  # the client left before its answer: it received none of it
                self._background_task(self._uncharge(task, rid))
                raise

    async def _uncharge(self, settle: asyncio.Task, rid: str) -> None:
        """Once ``rid``'s settle is acknowledged, take back its charge (Allocator.correct): its client left
        while the answer waited for that acknowledgement, so it received nothing."""
        await asyncio.wait({settle})
        await _until_acknowledged(lambda: self.allocator.correct.remote(rid, 0), f"correction of {rid}",
                                  "charged for an answer it did not receive")

    def _ensure_lease(self) -> None:
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.get_running_loop().create_task(self._renew_lease(),
                                                                      context=contextvars.Context())

    async def _renew_lease(self) -> None:
        """Renew this replica's lease a few times per lease TTL, for as long as the replica lives."""
        every = self.config.allocator.advanced.lease_ttl_s / 4
        while True:
            stop_if_cancelled()
            try:
                await self.allocator.renew.remote(self.owner)
            except Exception as exc:  # the allocator is restarting: a restored ledger gives a fresh lease
                logger.info("lease renewal failed: %s", type(exc).__name__)
            await asyncio.sleep(every)

    def __del__(self):
        """Serve calls this when the replica stops, once its requests have ended, and awaits what it returns:
        end the loops (deployments.background) and, with decisions at the ingress, report one last time so
        what this replica charged since its last report reaches the books (a rolling update or a scale-down
        would otherwise lose it, and the lease would lapse with those caps counted as recovered)."""
        cancel_on_stop(getattr(self, "_lease_task", None))
        if getattr(self, "observations", None) is not None:
            self.observations.stop()
        leases = getattr(self, "leases", None)
        if leases is None:
            return None
        leases.stop()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # collected outside an event loop: nothing can be reported
            return None
        return None if leases.last_reported else leases.last_report()

    # -- answers --------------------------------------------------------------------

    async def _whole(self, req, rid, ereq, prompt_tokens, clear, cut):
        """A non-streaming answer from the replay engine, written here around the engine's text."""
        async def build():
            tally = {"tokens": 0, "finish": None, "info": None}
            parts = [chunk.text async for chunk in self._engine_stream(ereq, tally)]
            if tally["info"] is not None:
                clear["replay"] = tally["info"]
            clear["stopped_by"] = _stopped_by(tally["finish"], cut)
            body = completion_body(req, rid, "".join(parts), tally["finish"], prompt_tokens, tally["tokens"], clear)
            return body, tally["tokens"]

        return await self._answer_whole(rid, build)

    def _observe(self, rid: str, tokens: int, ended: str | None) -> None:
        """The learner's record of a settled request (deployments.traffic_log), sent in a batch off the request
        path (deployments.learner_client.ObservationSender)."""
        seen = self._seen.pop(rid, None)
        if seen is None or ended is None or self.observations is None:
            return
        pred = seen["pred"]
        try:
            features = getattr(pred, "features", None)
            record = TrafficRecord(
                time=time.time(), request_id=rid, tenant=seen["tenant"], model=seen["model"],
                prompt_sha256=TrafficRecord.prompt_hash(seen["prompt"]), prediction_source=pred.source,
                predicted_threshold_tokens=float(pred.threshold_tokens),
                raw_threshold_tokens=getattr(pred, "raw_threshold_tokens", None), log_sigma=float(pred.log_sigma),
                runaway=float(getattr(pred, "runaway", 0.0)), cap_tokens=int(seen["cap"]), tokens=int(tokens),
                ended=ended, choices=int(seen["choices"]),
                features=None if features is None else encode_features(features),
                prompt=seen["prompt"] if self.config.learner.advanced.log_prompts else None,
                model_version=int(getattr(pred, "model_version", 0)), explored=bool(seen["explored"]))
            self.observations.add(record)
        except Exception:  # the learner's record never fails a request
            logger.exception("learner: record of %s not sent", rid)

    async def _answer_whole(self, rid: str, build, cleanup=None):
        """Send the body ``build()`` makes (``(body, tokens generated)``) and settle it: charged the tokens
        generated if it is sent, nothing if not (a failure, or a client gone before the body)."""
        sent, outcome, etype = False, "error", "internal_error"
        try:
            body, tokens = await build()
            sent, outcome, etype = True, "admitted", ""
            natural = body.get("clear", {}).get("stopped_by") == "natural_stop"
            await self._settle_acknowledged(rid, tokens, "natural" if natural else "cap")
            return body
        except ClearError as exc:
            outcome, etype = outcome_of(exc), exc.error_type
            return _error_response(exc)
        except (asyncio.CancelledError, GeneratorExit):
            outcome, etype = "admitted", "client_disconnected"
            raise
        finally:
            if cleanup is not None:
                await cleanup()
            if not sent:
                self._settle(rid, 0, failed=True, ended="client" if etype == "client_disconnected" else "failed")
            self._count(outcome, etype)

    async def _relay(self, req, rid: str, cap: int, thinking: int | None, clear: dict, cut: str):
        """vLLM's answer to the client's own request, capped (deployments.passthrough): relayed whole or as a
        stream; what vLLM refuses before answering is refunded whole and answered with its status."""
        try:
            end_id = None if thinking is None else await self.engine.thought_end_id()
            request, plan = self.engine.engine_request(req, rid, cap, thinking,
                                                       token_ids=end_id is not None and not req.stream)
        except BaseException:
            self._settle(rid, 0, failed=True)
            raise
        want = int(request.__dict__["max_tokens"])  # what vLLM was asked for (not getattr: deprecated in chat)
        on_finish = None if plan is None else _scored_replay(plan, cap, want)
        items = self._engine_items(rid, request)
        answered = False
        try:
            first = await items.__anext__()
            refused = refusal_in(first)
            if refused is not None:
                raise refused
            answered = True
        except StopAsyncIteration:
            exc = EngineError("the engine ended the request without an answer; nothing was charged")
            self._count(outcome_of(exc), exc.error_type)
            return _error_response(exc)
        except ClearError as exc:
            self._count(outcome_of(exc), exc.error_type)
            return _error_response(exc)
        except (asyncio.CancelledError, GeneratorExit):  # the client left before anything was sent
            self._count("admitted", "client_disconnected")
            raise
        finally:
            if not answered:  # nothing reached the client: refunded whole
                await items.aclose()
                self._settle(rid, 0, failed=True)
        stopped = lambda finish: _stopped_by(finish, cut)  # noqa: E731
        if not req.stream:
            async def build():
                body, tally = whole_answer(first, rid, clear, stopped, on_finish, thought_end_id=end_id,
                                           keep_token_ids=bool(getattr(req.request, "return_token_ids", False)))
                return body, tally.tokens

            return await self._answer_whole(rid, build, cleanup=items.aclose)
        relay = StreamRelay(rid, clear, stopped, include_usage=req.include_usage,
                            continuous_usage=req.continuous_usage, on_finish=on_finish,
                            count_reasoning=thinking is not None, cap=want)
        return StreamingResponse(self._relay_sse(rid, relay, first, items), media_type="text/event-stream")

    async def _relay_sse(self, rid: str, relay: StreamRelay, first, items):
        """A relayed stream: charged the tokens vLLM reports generated, whether it ends, fails or the client leaves."""
        outcome, etype, failed, settled = "admitted", "client_disconnected", False, False
        try:
            for line in relay.feed(first):
                yield line
            async for item in items:
                for line in relay.feed(item):
                    yield line
            settled = True
            cut = CAP_STOP in relay.tally.finish.values()
            await self._settle_acknowledged(rid, relay.tally.tokens, "cap" if cut else "natural")
            yield SSE_DONE
            etype = ""
        except ClearError as exc:
            outcome, etype, failed = outcome_of(exc), exc.error_type, True
            yield sse_error(exc)
            yield SSE_DONE
        finally:
            await items.aclose()
            if not settled:
                self._settle(rid, relay.tally.tokens, failed=failed, ended="failed" if failed else "client")
            self._count(outcome, etype)

    async def _engine_items(self, rid: str, request):
        """What Ray Serve LLM answers, item by item; a failure of the engine as a clean client error."""
        gen = self.engine.forward(request)
        try:
            async for item in gen:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            await gen.aclose()  # cancels the engine's remote stream
            raise
        except Exception as exc:
            failure = _engine_failure(exc)
            logger.log(logging.DEBUG if failure.http_status < 500 else logging.WARNING, "engine failed on %s: %s: %s",
                       rid, type(getattr(exc, "cause", None) or exc).__name__, failure)
            raise failure from None

    async def _sse(self, req, rid, ereq, prompt_tokens, clear, cut):
        """A stream: charged the tokens sent, whether it ends, fails or the client leaves."""
        tally = {"tokens": 0, "finish": None, "info": None}
        created = int(time.time())
        outcome, etype, failed, settled = "admitted", "client_disconnected", False, False
        try:
            yield sse_chunk(req, rid, created, "", None, first=True, clear=clear)
            async for chunk in self._engine_stream(ereq, tally):
                if chunk.text:
                    yield sse_chunk(req, rid, created, chunk.text, None)
                if chunk.finish_reason is not None:
                    final = dict(clear, stopped_by=_stopped_by(chunk.finish_reason, cut))
                    if chunk.info is not None:
                        final["replay"] = chunk.info
                    yield sse_chunk(req, rid, created, None, chunk.finish_reason, clear=final)
            settled = True
            await self._settle_acknowledged(rid, tally["tokens"], "cap" if tally["finish"] == CAP_STOP else "natural")
            if req.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tally["tokens"],
                         "total_tokens": prompt_tokens + tally["tokens"]}
                yield sse_chunk(req, rid, created, None, None, usage=usage)
            yield SSE_DONE
            etype = ""
        except ClearError as exc:
            outcome, etype, failed = outcome_of(exc), exc.error_type, True
            yield sse_error(exc)
            yield SSE_DONE
        finally:
            if not settled:
                self._settle(rid, tally["tokens"], failed=failed, ended="failed" if failed else "client")
            self._count(outcome, etype)


def _cut_by(client_max_tokens: int | None, cap: int, market_cap: int, room: int) -> str:
    """Who set the engine's cap (per choice): the client's max_tokens, CLEAR's market cap, or the context window."""
    if client_max_tokens is not None and cap == client_max_tokens and client_max_tokens <= market_cap:
        return "client_max_tokens"
    if cap == room and room < market_cap:
        return "context_limit"
    return "clear_cap"


def _scored_replay(plan, cap: int, want: int):
    """A replay on vLLM ends as its trace says, scored for the tokens really generated (``want``: what vLLM
    was asked for; all of them mean the whole cap was spent as recorded)."""
    def on_finish(reason, tokens):
        got = cap if tokens >= want else tokens
        return plan.finish_reason(got), {"replay": {**plan.info(got), "engine": "vllm", "engine_finish_reason": reason}}

    return on_finish


def _stopped_by(finish: str | None, cut: str) -> str:
    """Why a completion ended: ``natural_stop``, or whoever set the cap it hit (:func:`_cut_by`)."""
    return cut if finish == CAP_STOP else "natural_stop"


async def _await(resp):
    return await resp


def _cancel(resp) -> None:
    try:
        resp.cancel()
    except Exception:
        pass


# Serve's FastAPI class-based view rewrites the route endpoints' signatures when
# the class is wrapped; it must happen at import time, so that a replica that
# imports this module gets the same rewritten routes as the driver.
async def _until_acknowledged(call, what: str, otherwise: str) -> None:
    """Await ``call()`` (a handle call the allocator applies once, idempotently), retried with backoff until it
    is acknowledged or SETTLE_RETRY_FOR_S passes (then logged with what ``otherwise`` happens)."""
    deadline = time.monotonic() + SETTLE_RETRY_FOR_S
    for attempt in range(1_000_000):
        try:
            await call()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                logger.error("%s never acknowledged: %r; %s", what, exc, otherwise)
                return
            await asyncio.sleep(SETTLE_BACKOFF_S[min(attempt, len(SETTLE_BACKOFF_S) - 1)])


IngressApp = serve.ingress(app)(Ingress)
