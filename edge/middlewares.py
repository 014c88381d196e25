"""Request id, tracing and the error envelope, for every route; the credential before the body.

An error answered before its request's body was all received (a 401 from
:func:`credential_first`, a 413 or 408 from ``edge.forms``, a form refused part
way) closes the connection without reading the rest: the client gets the answer
(and a second to read it), and the edge does not take the remaining upload
(aiohttp would otherwise read and discard it for up to ten seconds).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
import zlib
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from opentelemetry import trace
from opentelemetry.propagate import extract

from edge.errors import error_response
from edge.flow import credential_from
from edge.forms import BodyRefused
from edge.keys import REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import json_response
from services.common.errors import (
    ErrorType,
    InvalidRequest,
    KilnError,
    NotFound,
    ProcessingError,
    envelope,
    quoted,
)

log = logging.getLogger("kiln.edge")
_tracer = trace.get_tracer("kiln.edge")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (method, route path) of the routes that need a credential (set by ``edge.app`` from the route table).
AUTHENTICATED_ROUTES = web.AppKey("authenticated_routes", frozenset[tuple[str, str]])


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives the request an id (kept from ``X-Request-ID`` when sane) and a server span."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _REQUEST_ID_RE.match(given) else f"req_{uuid.uuid4().hex}"
    request[REQUEST_ID] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    with _tracer.start_as_current_span(
        f"{request.method} {route}",
        context=extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "url.path": request.path,
            "kiln.request_id": request_id,
        },
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        response.headers["X-Request-ID"] = request_id
        await _maybe_gzip(request, response)
        if response.status >= 400 and request.body_exists and not request.content.is_eof():
            await _answer_and_close(request, response)
        return response


#: How long a connection refused before its body was read stays open after the answer (with
#: its sending side closed), so that the client reads the answer before the connection is
#: reset. Nothing more is read meanwhile: TCP flow control stops the client's upload.
LINGER_SECONDS = 1.0


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Sends ``response`` and closes the connection without reading the rest of the body."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    transport = request.transport
    if transport is not None and not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()
        await asyncio.sleep(LINGER_SECONDS)  # cancelled sooner if the client closes first
    request.protocol.force_close()


@web.middleware
async def credential_first(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routes that need a credential refuse a request without one (401) before the handler
    runs; a body larger than ``max_unauthenticated_body_bytes``, or of unknown length, is
    read only once billing has accepted the credential (Authenticate: the hold comes later,
    with the price). Smaller bodies are read and checked first; Authorize then checks the
    credential with the hold, as before."""
    if _needs_credential(request):
        credential = credential_from(request)
        if request.body_exists and not _small_body(request) and not request.get(CREDENTIAL_CHECKED):
            await request.app[UPSTREAMS].billing.authenticate(credential, request[REQUEST_ID])
    return await handler(request)


#: Set on a request whose credential billing accepted before its body was sent (Expect).
CREDENTIAL_CHECKED = "kiln.credential_checked"


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The routes' ``Expect: 100-continue`` handler (curl sends it for bodies over 1 MiB): on a
    route that needs a credential, billing checks it *before* ``100 Continue`` invites the
    body, so a refused client never sends its upload. aiohttp runs this before the
    middlewares, so a refusal is answered here, in the envelope, and the connection closes."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11 or expect.lower() != "100-continue":
        return error_response(InvalidRequest(f"Unsupported Expect header: '{quoted(expect)}'"), status=417)
    if _needs_credential(request):
        request_id = request.headers.get("X-Request-ID", "")
        if not _REQUEST_ID_RE.match(request_id):
            request_id = uuid.uuid4().hex
        try:
            await request.app[UPSTREAMS].billing.authenticate(credential_from(request), request_id)
        except KilnError as err:
            response = error_response(err)
            response.headers["X-Request-ID"] = request_id
            response.force_close()
            return response
        request[CREDENTIAL_CHECKED] = True
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer's own size starts after the interim line
    return None


def _needs_credential(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    route = (request.method, resource.canonical if resource is not None else "")
    return route in request.app[AUTHENTICATED_ROUTES]


def _small_body(request: web.Request) -> bool:
    length = request.content_length
    return length is not None and length <= request.app[SETTINGS].max_unauthenticated_body_bytes


#: JSON bodies smaller than this are sent as they are.
GZIP_MIN_BYTES = 1024
#: From this size on a JSON body here is base64 image data, which LZ77 matching
#: cannot shrink: Huffman coding alone saves the same ~25% at a sixth of the CPU
#: (measured on a 256x256 PNG: 1.1 ms instead of 6.1 ms, ratio 0.753 vs 0.757).
GZIP_HUFFMAN_ONLY_BYTES = 64 * 1024
#: Bodies from this size on are compressed on a thread, not on the event loop.
GZIP_THREAD_BYTES = 1024 * 1024


async def _maybe_gzip(request: web.Request, response: web.StreamResponse) -> None:
    """Compresses JSON responses for clients that send ``Accept-Encoding: gzip``."""
    if not (
        isinstance(response, web.Response)
        and response.content_type == "application/json"
        and isinstance(response.body, bytes)
        and len(response.body) >= GZIP_MIN_BYTES
        and "gzip" in request.headers.get("Accept-Encoding", "").lower()
    ):
        return
    body = response.body
    if len(body) >= GZIP_THREAD_BYTES:
        response.body = await asyncio.to_thread(_gzip, body)
    else:
        response.body = _gzip(body)
    response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"


def _gzip(body: bytes) -> bytes:
    strategy = zlib.Z_HUFFMAN_ONLY if len(body) >= GZIP_HUFFMAN_ONLY_BYTES else zlib.Z_DEFAULT_STRATEGY
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8, strategy)
    return compressor.compress(body) + compressor.flush()


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in the contract's envelope; nothing leaves as a traceback. On the
    tasks routes (``/v1/tasks``), seed 003's shape instead (:func:`_tasks_error`)."""
    response = await _errors_answered(request, handler)
    if response.status >= 400 and _is_tasks_route(request) and isinstance(response, web.Response):
        return _tasks_error(request, response)
    return response


def _is_tasks_route(request: web.Request) -> bool:
    return request.path == "/v1/tasks" or request.path.startswith("/v1/tasks/")


def _tasks_error(request: web.Request, response: web.Response) -> web.Response:
    """``{"success": false, "code": <status>, "data": {"message", "request_id"}}`` from the
    contract's envelope (the status and headers stay)."""
    try:
        message = orjson.loads(response.body if isinstance(response.body, bytes) else b"")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason or "Error"
    data = {"message": message, "request_id": request[REQUEST_ID]}
    answer = json_response({"success": False, "code": response.status, "data": data}, status=response.status)
    for name, value in response.headers.items():
        if name.lower() not in ("content-type", "content-length"):
            answer.headers[name] = value
    return answer


async def _errors_answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except KilnError as err:
        return error_response(err)
    except BodyRefused as refused:
        return error_response(InvalidRequest(refused.message), status=refused.status)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(
            InvalidRequest(f"The request body is larger than the limit of {limit} bytes."), status=413
        )
    except web.HTTPNotFound:
        return error_response(NotFound(f"Unknown route: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            InvalidRequest(f"Method {request.method} is not allowed on {request.path}"), status=405
        )
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(envelope(exc.reason, ErrorType.INVALID_REQUEST), status=exc.status)
    except Exception:
        log.exception("unhandled error in %s %s (%s)", request.method, request.path, request.get(REQUEST_ID))
        return error_response(ProcessingError("Internal error while processing the request."))
