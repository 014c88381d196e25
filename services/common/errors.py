"""The contract's error types, in one place.

Engines and servicers raise :class:`KilnError` subclasses; they know nothing of
gRPC or HTTP. The gRPC server interceptor (``services.common.grpc_server``)
turns them into a ``google.rpc.Status`` with an ``ErrorInfo`` whose ``reason``
is the error type, and the edge turns that back into an HTTP status and the
``{"error": {"message", "type"}}`` envelope. Both read the table below, so the
mapping cannot drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: ``ErrorInfo.domain`` of every error Kiln raises.
ERROR_DOMAIN = "kiln.dev"


class ErrorType(StrEnum):
    """The ``error.type`` values of the public contract (plus two of our own)."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    PREMIUM_REQUIRED = "premium_required"
    PROCESSING = "processing_error"
    MAINTENANCE = "maintenance_mode"
    RATE_LIMIT = "rate_limit_error"
    NOT_FOUND = "not_found_error"


@dataclass(frozen=True)
class ErrorMapping:
    """How one error type travels: its gRPC status code name and HTTP status."""

    grpc_code: str
    http_status: int


ERROR_MAPPINGS: dict[ErrorType, ErrorMapping] = {
    ErrorType.INVALID_REQUEST: ErrorMapping("INVALID_ARGUMENT", 400),
    ErrorType.AUTHENTICATION: ErrorMapping("UNAUTHENTICATED", 401),
    ErrorType.INSUFFICIENT_CREDITS: ErrorMapping("FAILED_PRECONDITION", 402),
    ErrorType.PREMIUM_REQUIRED: ErrorMapping("PERMISSION_DENIED", 403),
    ErrorType.NOT_FOUND: ErrorMapping("NOT_FOUND", 404),
    ErrorType.RATE_LIMIT: ErrorMapping("RESOURCE_EXHAUSTED", 429),
    ErrorType.PROCESSING: ErrorMapping("INTERNAL", 500),
    ErrorType.MAINTENANCE: ErrorMapping("UNAVAILABLE", 503),
}

MAINTENANCE_MESSAGE = "We're in maintenance mode now. Please try again later"
AUTHENTICATION_MESSAGE = "Authentication failed. Provide a valid API Key in the 'X-API-Key' header or log in."


#: Characters of a caller's value that an error message quotes back.
QUOTED_INPUT_CHARS = 100


def quoted(value: str, limit: int = QUOTED_INPUT_CHARS) -> str:
    """A caller's value for an error message: at most ``limit`` characters (then "...")."""
    return value if len(value) <= limit else value[:limit] + "..."


#: ``ErrorInfo.metadata`` key of an error's retry hint, in whole milliseconds.
RETRY_AFTER_MS_KEY = "retry_after_ms"


def envelope(message: str, error_type: ErrorType | str) -> dict[str, dict[str, Any]]:
    """``{"error": {"message": ..., "type": ..., "param": null, "code": null}}``: the contract's
    ``message`` and ``type``, with OpenAI's ``param`` and ``code`` (always null: the message
    names the parameter, and ``type`` is the machine-readable kind) so OpenAI's clients and
    schema accept it. The edge answers every error with it; billing stores it on failed tasks
    and gives it to Envoy for the limiter's 429."""
    return {"error": {"message": message, "type": str(error_type), "param": None, "code": None}}


def envelope_json(message: str, error_type: ErrorType | str) -> bytes:
    """:func:`envelope` as JSON bytes."""
    return json.dumps(envelope(message, error_type), separators=(",", ":")).encode()


def cancelled_task_error() -> bytes:
    """The error a cancelled task ends with, whoever ends it (billing for a pending task, the
    edge's worker for a running one): the caller asked for it, so not a processing error."""
    return envelope_json("The task was cancelled; nothing was charged.", ErrorType.INVALID_REQUEST)


class KilnError(Exception):
    """An error with a contract type and a message safe to show the caller.

    ``metadata`` travels with it across gRPC (``ErrorInfo.metadata``). ``retry_after``
    (seconds) is the one entry the edge reads: it answers it as ``Retry-After`` and
    ``retry-after-ms`` headers (a model still loading, a rate limit)."""

    error_type: ErrorType = ErrorType.PROCESSING
    default_message: str = "The request could not be processed."

    def __init__(
        self,
        message: str | None = None,
        *,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.metadata = dict(metadata or {})
        if retry_after is not None:
            self.metadata[RETRY_AFTER_MS_KEY] = str(max(0, round(retry_after * 1000)))

    @property
    def retry_after(self) -> float | None:
        """Seconds the caller should wait before trying again, when the error says."""
        try:
            return int(self.metadata[RETRY_AFTER_MS_KEY]) / 1000
        except (KeyError, ValueError):
            return None

    #: How this error travels when it is not its type's usual one (e.g. a 409).
    mapping_override: ErrorMapping | None = None

    @property
    def mapping(self) -> ErrorMapping:
        return self.mapping_override or ERROR_MAPPINGS[self.error_type]


class InvalidRequest(KilnError):
    error_type = ErrorType.INVALID_REQUEST
    default_message = "Invalid request."


class Conflict(InvalidRequest):
    """The request collides with another one in flight (an idempotency key in use): a 409
    with the contract's ``invalid_request_error`` type."""

    mapping_override = ErrorMapping("ABORTED", 409)
    default_message = "A request with this idempotency key is in progress."


class AuthenticationFailed(KilnError):
    error_type = ErrorType.AUTHENTICATION
    default_message = AUTHENTICATION_MESSAGE


class CsrfRejected(AuthenticationFailed):
    """A state-changing request authenticated by the session cookie without the session's
    CSRF token in ``X-CSRF-Token``: a 403 with the contract's ``authentication_error`` type
    (the credential is valid; the request's origin is not proven)."""

    mapping_override = ErrorMapping("PERMISSION_DENIED", 403)
    default_message = (
        "A request authenticated by the session cookie that changes state needs the session's "
        "CSRF token in the 'X-CSRF-Token' header."
    )


class InsufficientCredits(KilnError):
    error_type = ErrorType.INSUFFICIENT_CREDITS
    default_message = "You do not have enough credits."


class PremiumRequired(KilnError):
    error_type = ErrorType.PREMIUM_REQUIRED
    default_message = "This endpoint requires a premium subscription."


class ProcessingError(KilnError):
    error_type = ErrorType.PROCESSING


class UpstreamUnavailable(ProcessingError):
    """A service did not answer in time or could not be reached: what the call did is unknown."""

    default_message = "An upstream service is unavailable; please try again."


class LowDiskSpace(ProcessingError):
    """The disk that holds the media (and the database) is nearly full: new paid work is
    refused with a 503 of the contract's ``processing_error`` type until space is freed."""

    mapping_override = ErrorMapping("UNAVAILABLE", 503)
    default_message = "The server is low on disk space and takes no new work for now; please try again later."


class MaintenanceMode(KilnError):
    error_type = ErrorType.MAINTENANCE
    default_message = MAINTENANCE_MESSAGE


class RateLimited(KilnError):
    error_type = ErrorType.RATE_LIMIT
    default_message = "Too many requests."


class NotFound(KilnError):
    error_type = ErrorType.NOT_FOUND
    default_message = "Not found."


_BY_TYPE: dict[ErrorType, type[KilnError]] = {
    cls.error_type: cls
    for cls in (
        InvalidRequest,
        AuthenticationFailed,
        InsufficientCredits,
        PremiumRequired,
        ProcessingError,
        MaintenanceMode,
        RateLimited,
        NotFound,
    )
}


#: Errors that travel with another gRPC code than their type's usual one.
_VARIANTS: dict[tuple[ErrorType, str], type[KilnError]] = {
    (cls.error_type, cls.mapping_override.grpc_code): cls
    for cls in (Conflict, CsrfRejected)
    if cls.mapping_override is not None
}


def error_from_type(
    error_type: ErrorType,
    message: str,
    grpc_code: str | None = None,
    metadata: dict[str, str] | None = None,
) -> KilnError:
    """Rebuilds the exception for an error type and gRPC code name, with its metadata (used
    when an error crosses gRPC)."""
    cls = _VARIANTS.get((error_type, grpc_code or ""), _BY_TYPE[error_type])
    return cls(message, metadata=metadata)
