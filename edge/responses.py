"""JSON responses, serialised with orjson (image responses carry megabytes of base64)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


#: Headers of a server-sent events response (no caching, no proxy buffering).
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: ``data`` as JSON, under ``event`` when given."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class ProgressEvents:
    """Optional server-sent progress for a long request (``Accept: text/event-stream``).

    :meth:`step` sends a ``progress`` event (the stream starts with the first
    one, so checks that fail before any work still answer a plain error);
    :meth:`finish` sends the ``result`` event and ends the stream; :meth:`fail`
    ends a started stream with an ``error`` event (the envelope).
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.wanted = "text/event-stream" in request.headers.get("Accept", "")
        self.response: web.StreamResponse | None = None

    async def _start(self) -> web.StreamResponse:
        if self.response is None:
            self.response = web.StreamResponse(headers=SSE_HEADERS)
            await self.response.prepare(self.request)
        return self.response

    async def step(self, step: int, total_steps: int) -> None:
        if self.wanted:
            response = await self._start()
            await response.write(sse_event({"step": step, "total_steps": total_steps}, "progress"))

    async def finish(self, result: Any) -> web.StreamResponse:
        response = await self._start()
        await response.write(sse_event(result, "result"))
        await response.write_eof()
        return response

    async def fail(self, error: dict[str, Any]) -> web.StreamResponse | None:
        """Ends a started stream with ``error``; None when nothing was sent yet (answer normally)."""
        if self.response is None:
            return None
        await self.response.write(sse_event(error, "error"))
        await self.response.write_eof()
        return self.response
