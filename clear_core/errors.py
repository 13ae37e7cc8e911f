"""One error hierarchy for the whole project.

Every error carries a stable ``error_type`` string. The serving layer uses it
both as the ``type`` of the OpenAI-style error body and as the ``outcome``
label of its metrics (the pattern Text Generation Inference uses), so the
string must never change once released.
"""

from __future__ import annotations


class ClearError(Exception):
    """Base class of every error this project raises on purpose."""

    error_type = "clear_error"
    # HTTP status the serving layer maps this error to.
    http_status = 500


class InvalidInputError(ClearError, ValueError):
    """An argument is out of its domain; the message names the bad value."""

    error_type = "invalid_request_error"
    http_status = 400

    def __init__(self, name: str, value: object, reason: str):
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name}={value!r}: {reason}")


class UnknownPolicyError(InvalidInputError):
    """A policy name that is not in the registry."""

    error_type = "unknown_policy"


class TraceFormatError(ClearError, ValueError):
    """A trace pool line does not follow the schema in shared/data/traces."""

    error_type = "trace_format_error"
    http_status = 500


class BudgetExhaustedError(ClearError):
    """The ledger cannot reserve the requested tokens without breaking the budget."""

    error_type = "budget_exhausted"
    http_status = 429


class UnknownReservationError(ClearError, KeyError):
    """A settle/release names a reservation the ledger does not hold."""

    error_type = "unknown_reservation"
    http_status = 409
