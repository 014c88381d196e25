"""The one place where an error becomes an HTTP status and the contract's envelope."""

from __future__ import annotations

from aiohttp import web

from edge.responses import json_response
from services.common.errors import ErrorType, KilnError


def envelope(message: str, error_type: ErrorType | str) -> dict[str, dict[str, str]]:
    """``{"error": {"message": ..., "type": ...}}``."""
    return {"error": {"message": message, "type": str(error_type)}}


def error_response(err: KilnError, *, status: int | None = None) -> web.Response:
    """The HTTP response for a Kiln error (status from the shared mapping table)."""
    return json_response(envelope(err.message, err.error_type), status=status or err.mapping.http_status)
