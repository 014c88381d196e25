"""The edge's Prometheus metrics and ``GET /metrics``.

Each app has its own registry (tests run many edges in one process). Counted always:

* ``kiln_http_requests_total{route,method,status}`` and
  ``kiln_http_request_duration_seconds{route,method}`` by :func:`record_metrics`, the
  outermost middleware (it sees the status of every answer, the error envelope's too, and
  times a streamed answer to its end). ``route`` is the route table's template
  (``/v1/tasks/{task_id}``), ``unmatched`` when no route takes the request (an unknown path,
  a method the path does not have); ``method`` is one of HTTP's, ``other`` for anything
  else; a request whose client went away before the answer is ``status="499"``. Every label
  thus has a bounded set of values.
* ``kiln_rate_limit_rejections_total{route}``: answers 429 (``rate_limit_error``).
* ``kiln_webhook_deliveries_total{outcome}``: webhook attempts ``delivered`` (2xx) or
  ``failed``, and messages that became ``dead`` (the retry schedule ran out) or ``disabled``
  (their endpoint answered 410) when billing recorded the attempt (``edge.webhooks``).

``GET /metrics`` answers them in the Prometheus text format, without a credential, when
``metrics_public`` is set (``KILN_METRICS_PUBLIC``); otherwise it is a 404 like an unknown
route. The gRPC services export their own (``services.common.metrics``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from edge.keys import SETTINGS
from services.common.metrics import LATENCY_BUCKETS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The ``method`` label's values (anything else is ``other``).
_METHODS = frozenset(hdrs.METH_ALL)
#: The status of a request whose client disconnected first (nginx's convention).
CLIENT_CLOSED = 499


class EdgeMetrics:
    """One edge's registry and metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kiln_http_request_duration_seconds",
            "Time from a request's start to the end of its answer, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "kiln_rate_limit_rejections",
            "Requests refused with 429 (rate_limit_error), by route template.",
            ["route"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "kiln_webhook_deliveries",
            "Webhook attempts delivered or failed, and messages that became dead or disabled.",
            ["outcome"],
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)
        if status == 429:
            self.rate_limited.labels(route).inc()

    def webhook(self, outcome: str) -> None:
        """One webhook outcome: ``delivered``, ``failed``, ``dead`` or ``disabled``."""
        self.webhooks.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", EdgeMetrics)


def route_template(request: web.Request) -> str:
    """The request's route as the route table spells it (``unmatched`` when none matched)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def record_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request (see the module docstring)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    except web.HTTPException as exc:  # raised past the envelope (a redirect, a 304)
        status = exc.status
        raise
    finally:
        request.app[METRICS].observe(
            route_template(request), request.method, status, time.perf_counter() - started
        )


async def get_metrics(request: web.Request) -> web.Response:
    """The edge's metrics in the Prometheus text format (404 unless ``metrics_public``)."""
    if not request.app[SETTINGS].metrics_public:
        raise web.HTTPNotFound()
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
