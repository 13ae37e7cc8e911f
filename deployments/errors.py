"""Serving errors: the HTTP side of the project's one error hierarchy.

Each class keeps a stable ``error_type`` (the OpenAI error body's ``type`` and
the ``error_type`` label of ``clear_requests``) and an ``http_status``. The base
classes live in :mod:`clear_core.errors`; these are the ones only a server raises.
"""

from __future__ import annotations

from clear_core.errors import BudgetExhaustedError, ClearError, InvalidInputError
from clear_core.online_market import DecisionReason


class BadRequestError(ClearError):
    """Malformed or out-of-range request (bad JSON, missing messages, bad max_tokens)."""

    error_type = "invalid_request_error"
    http_status = 400

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class RequestTooLargeError(BadRequestError):
    """The request body exceeds ``ingress.advanced.max_request_body_bytes``."""

    error_type = "request_too_large"
    http_status = 413


class RequestTimeoutError(BadRequestError):
    """The request body did not arrive in time, or too many bodies are arriving slowly (deployments.http_body)."""

    error_type = "request_timeout"
    http_status = 408


class UnsupportedMediaTypeError(BadRequestError):
    """The body is declared as something other than JSON (``Content-Type``)."""

    error_type = "unsupported_media_type"
    http_status = 415


class ClientDisconnectedError(BadRequestError):
    """The client left before its request body arrived (nobody reads the answer; nginx's 499)."""

    error_type = "client_disconnected"
    http_status = 499


class ContextLengthError(BadRequestError):
    """The prompt (plus the requested completion) does not fit the context limit."""

    error_type = "context_length_exceeded"


class ModelNotFoundError(ClearError):
    error_type = "model_not_found"
    http_status = 404


class RouteNotFoundError(ClearError):
    """No such route (or not with this method): answered as JSON like every other error."""

    error_type = "not_found_error"
    http_status = 404


class MethodNotAllowedError(ClearError):
    error_type = "method_not_allowed"
    http_status = 405


class NotImplementedByEngineError(ClearError):
    """The engine behind this server cannot answer this call (e.g. token ids without a tokenizer)."""

    error_type = "not_implemented"
    http_status = 501


class InternalServerError(ClearError):
    """A bug: the details go to the server log, never to the client."""

    error_type = "internal_error"
    http_status = 500


class AuthenticationError(ClearError):
    error_type = "authentication_error"
    http_status = 401


class BudgetAbandonedError(BudgetExhaustedError):
    """CLEAR abandoned the request: it cannot pay back its cost at the current shadow price.

    The market's answer (``DecisionReason.INSOLVENT``): the price is high
    because demand is hard for the budget. :class:`BudgetPoolEmptyError` is the
    other abandonment. Build either with :func:`abandonment_error`.
    """

    error_type = "budget_abandoned"
    http_status = 429

    def __init__(self, message: str, shadow_price: float, retry_after_s: float, threshold_tokens: float,
                 should_retry: bool = False):
        self.shadow_price = shadow_price
        self.retry_after_s = retry_after_s
        self.threshold_tokens = threshold_tokens
        self.should_retry = should_retry  # x-should-retry: whether a retry after Retry-After is worth it
        super().__init__(message)


class BudgetPoolEmptyError(BudgetAbandonedError):
    """Solvent at the shadow price, but the pool cannot cover the predicted threshold now
    (``DecisionReason.POOL_EMPTY``): the budget is drained; ``Retry-After`` is the refill time."""

    error_type = "budget_pool_empty"


def abandonment_error(decision, predicted_threshold_tokens: float | None = None) -> BudgetAbandonedError:
    """The 429 for an abandoned :class:`~clear_core.online_market.Decision`.

    ``predicted_threshold_tokens``: what the predictor says the request needs (its calibrated median), the
    number an admitted request's ``clear`` object reports too. A market that prices length histograms is
    told the raw prediction instead (``Decision.threshold_tokens``); None reports that.
    """
    need = decision.threshold_tokens if predicted_threshold_tokens is None else float(predicted_threshold_tokens)
    if decision.reason is DecisionReason.POOL_EMPTY:
        cls, why = BudgetPoolEmptyError, "the budget pool cannot cover its predicted threshold now"
    else:
        cls, why = BudgetAbandonedError, "it cannot pay back its cost at the shadow price"
    return cls(
        f"request abandoned: predicted threshold {need:.0f} tokens; {why} "
        f"(shadow price {decision.shadow_price:.6g}, reason {decision.reason.value})",
        shadow_price=decision.shadow_price,
        retry_after_s=decision.retry_after_s,
        threshold_tokens=need,
        should_retry=decision.should_retry,
    )


class EngineError(ClearError):
    """The engine failed while serving an admitted request (its reservation is settled)."""

    error_type = "engine_error"
    http_status = 502


class EngineRefusedError(ClearError):
    """vLLM refused an admitted request with its own check (a prompt longer than its context, a field its model
    cannot honour): answered with vLLM's status and message in OpenAI's shape; the reservation is refunded whole."""

    def __init__(self, message: str, status: int, param: str | None = None, error_type: str | None = None):
        self.http_status = int(status) if 400 <= int(status) <= 599 else 500
        self.error_type = error_type or ("invalid_request_error" if self.http_status < 500 else "engine_error")
        self.param = param
        super().__init__(message)

    @classmethod
    def of(cls, error: dict) -> EngineRefusedError:
        """From vLLM's error body (``{"message", "type", "param", "code"}``, ``code`` its HTTP status)."""
        code = error.get("code")
        status = code if isinstance(code, int) and not isinstance(code, bool) else 500
        kind = error.get("type")
        openai_type = "invalid_request_error" if kind in (None, "BadRequestError") and status < 500 else None
        return cls(f"{error.get('message', 'the engine refused the request')} (nothing was charged)", status,
                   error.get("param"), openai_type)


class AllocatorUnavailableError(ClearError):
    """The allocator could not be reached (it is restarting); nothing was charged. Safe to retry."""

    error_type = "allocator_unavailable"
    http_status = 503
    retry_after_s = 1.0
    should_retry = True


def outcome_of(exc: ClearError) -> str:
    """The ``outcome`` label of ``clear_requests`` for an error: abandoned, rejected or error."""
    if isinstance(exc, BudgetAbandonedError):
        return "abandoned"
    if 400 <= exc.http_status < 500:
        return "rejected"
    return "error"


__all__ = [
    "AllocatorUnavailableError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetAbandonedError",
    "BudgetPoolEmptyError",
    "ClearError",
    "ClientDisconnectedError",
    "ContextLengthError",
    "EngineError",
    "EngineRefusedError",
    "InternalServerError",
    "InvalidInputError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "RouteNotFoundError",
    "UnsupportedMediaTypeError",
    "abandonment_error",
    "NotImplementedByEngineError",
    "outcome_of",
]
