"""Ingress: the OpenAI-compatible HTTP front end (FastAPI through ``@serve.ingress``).

Request path of a completion::

    auth (401) -> parse + validate (4xx) -> predict tau_hat (fallback on error or timeout)
    -> allocator.reserve (429 budget_abandoned) -> engine with max_tokens = min(client, CLEAR cap)
    -> settle the reservation with the tokens generated (always, in a finally)

Nothing touches the budget before validation has passed. Once a reservation
exists it is settled exactly once, whatever happens: normal end, early stop,
client disconnect (the stream is cancelled; the request is charged the tokens
the ingress received), engine error or dead engine replica. If the ingress
itself dies, the allocator expires the reservation after its TTL.
"""


import asyncio
import contextvars
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from ray import serve
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.config import AppConfig
from deployments.engines import engine_client
from deployments.engines.base import EngineRequest
from deployments.errors import (
    AllocatorUnavailableError,
    AuthenticationError,
    BadRequestError,
    BudgetAbandonedError,
    ClearError,
    ContextLengthError,
    EngineError,
    ModelNotFoundError,
    RequestTooLargeError,
    abandonment_error,
    outcome_of,
)
from deployments.messages import Decision, Prediction
from deployments.openai_schema import (
    SSE_DONE,
    ParsedRequest,
    completion_body,
    error_body,
    parse_chat,
    parse_completion,
    retry_after_header,
    sse_chunk,
    sse_error,
)
from deployments.predictor_backends import heuristic_prediction
from deployments.tokens import TokenCodec

logger = logging.getLogger("ray.serve")

app = FastAPI(title="CLEAR", description="Token-budget allocation with a shadow price (OpenAI-compatible API)")


def _error_response(exc: ClearError) -> JSONResponse:
    headers = {"Retry-After": retry_after_header(exc)} if isinstance(exc, BudgetAbandonedError) else None
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)


class Ingress:
    def __init__(self, config: AppConfig, predictor, allocator, engine, metrics: bool = True):
        self.config = config
        self.predictor = predictor
        self.allocator = allocator
        self.engine = engine_client(config.engine, engine, config.model_name)
        tok = getattr(self.config.engine, "tokenizer_path", None)
        self.codec = TokenCodec(tok)
        self._keys = [k.encode() for k in self.config.ingress.api_keys]
        self._background: set[asyncio.Task] = set()
        self.metrics = None
        if metrics:
            from deployments.metrics import IngressMetrics

            self.metrics = IngressMetrics()

    # -- routes ----------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except ClearError as exc:
            return _error_response(exc)
        now = int(time.time())
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": now, "owned_by": "clear"}]}

    @app.get("/v1/clear/status")
    async def status(self, request: Request):
        try:
            self._auth(request)
            return await self.allocator.status.remote()
        except ClearError as exc:
            return _error_response(exc)

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

    async def _read(self, request: Request, kind: str) -> ParsedRequest:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.config.ingress.max_request_body_bytes:
            raise RequestTooLargeError(f"request body of {size} bytes exceeds {self.config.ingress.max_request_body_bytes}")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"the request body is not valid JSON: {exc}") from None
        limit = self.config.context_limit_tokens
        req = parse_chat(body, limit) if kind == "chat" else parse_completion(body, limit)
        if req.model != self.config.model_name:
            raise ModelNotFoundError(f"model {req.model!r} does not exist; this server serves {self.config.model_name!r}")
        return req

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
        try:
            resp = self.predictor.predict.remote(prompt)
            try:
                pred = await asyncio.wait_for(_await(resp), timeout=self.config.predictor.timeout_s)
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
            req = await self._read(request, kind)
            prompt_tokens, room = self._completion_limit(req)
            client_cap = min(req.max_tokens or room, room)
            t0 = time.perf_counter()
            pred = await self._predict(req.prompt)
            t1 = time.perf_counter()
            try:
                decision: Decision = await self.allocator.reserve.remote(
                    rid, pred.threshold_tokens, pred.log_sigma, int(client_cap)
                )
                t2 = time.perf_counter()
            except ClearError:
                raise
            except Exception as exc:
                raise AllocatorUnavailableError(f"the allocator is unavailable: {type(exc).__name__}") from exc
            if not decision.admitted:
                raise abandonment_error(decision)
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
            # Time this request spent in the predictor and the allocator (the CLEAR overhead), ms.
            "timing_ms": {"predict": 1e3 * (t1 - t0), "allocate": 1e3 * (t2 - t1)},
        }
        ereq = EngineRequest(
            request_id=rid, kind=kind, prompt=req.prompt, messages=req.messages, cap_tokens=int(decision.cap_tokens),
            model=req.model, sample_index=req.sample_index, sampling=req.sampling, stream=req.stream,
        )
        if req.stream:
            return StreamingResponse(self._sse(req, rid, ereq, prompt_tokens, clear), media_type="text/event-stream")
        return await self._whole(req, rid, ereq, prompt_tokens, clear)

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
        except ClearError:
            raise
        except Exception as exc:
            raise EngineError(f"the engine failed: {type(exc).__name__}: {exc}") from exc

    def _settle(self, rid: str, tokens: int) -> None:
        """Settle in a task of its own, so a cancelled request (client gone) still settles.

        The task runs in an empty ``contextvars.Context``: Serve tracks the
        handle calls made inside a request's context as its children and
        cancels them when the request is cancelled (a client disconnect), which
        would cancel this very settle and leak the reservation.
        """

        async def run():
            try:
                await self.allocator.settle.remote(rid, int(tokens))
            except Exception:
                logger.exception("settle of %s failed; the reservation will expire", rid)

        task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _whole(self, req, rid, ereq, prompt_tokens, clear):
        tally = {"tokens": 0, "finish": None, "info": None}
        parts = []
        outcome, etype = "error", "internal_error"
        try:
            async for chunk in self._engine_stream(ereq, tally):
                parts.append(chunk.text)
            outcome, etype = "admitted", ""
        except ClearError as exc:
            outcome, etype = outcome_of(exc), exc.error_type
            return _error_response(exc)
        except (asyncio.CancelledError, GeneratorExit):
            outcome, etype = "admitted", "client_disconnected"
            raise
        finally:
            self._settle(rid, tally["tokens"])
            self._count(outcome, etype)
        if tally["info"] is not None:
            clear["replay"] = tally["info"]
        return completion_body(req, rid, "".join(parts), tally["finish"], prompt_tokens, tally["tokens"], clear)

    async def _sse(self, req, rid, ereq, prompt_tokens, clear):
        tally = {"tokens": 0, "finish": None, "info": None}
        created = int(time.time())
        outcome, etype = "admitted", "client_disconnected"
        try:
            yield sse_chunk(req, rid, created, "", None, first=True, clear=clear)
            async for chunk in self._engine_stream(ereq, tally):
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield sse_chunk(req, rid, created, chunk.text, None)
                else:
                    if chunk.text:
                        yield sse_chunk(req, rid, created, chunk.text, None)
                    final = dict(clear)
                    if chunk.info is not None:
                        final["replay"] = chunk.info
                    yield sse_chunk(req, rid, created, None, chunk.finish_reason, clear=final)
            if req.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tally["tokens"], "total_tokens": prompt_tokens + tally["tokens"]}
                yield sse_chunk(req, rid, created, None, None, usage=usage)
            yield SSE_DONE
            etype = ""
        except ClearError as exc:
            outcome, etype = outcome_of(exc), exc.error_type
            yield sse_error(exc)
            yield SSE_DONE
        finally:
            self._settle(rid, tally["tokens"])
            self._count(outcome, etype)


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
IngressApp = serve.ingress(app)(Ingress)
