"""The one place where an error becomes an HTTP status and the contract's envelope."""

from __future__ import annotations

import math

from aiohttp import web

from edge.responses import json_response
from services.common.errors import KilnError, envelope


def error_response(err: KilnError, *, status: int | None = None) -> web.Response:
    """The HTTP response for a Kiln error (status from the shared mapping table). An error
    that says when to try again (:attr:`KilnError.retry_after`: a model still loading, a rate
    limit) also gets ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``."""
    response = json_response(envelope(err.message, err.error_type), status=status or err.mapping.http_status)
    retry_after = err.retry_after
    if retry_after is not None:
        response.headers["Retry-After"] = str(math.ceil(retry_after))
        response.headers["retry-after-ms"] = str(round(retry_after * 1000))
    return response
