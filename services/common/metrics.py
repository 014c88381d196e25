"""Prometheus metrics of one gRPC service: calls, engines, and an HTTP ``/metrics`` for them.

Every :class:`~services.common.grpc_server.GrpcService` has a :class:`ServiceMetrics` with a
registry of its own (not ``prometheus_client``'s global one: tests start many servers in one
process, and each must count only its own calls). It holds

* ``kiln_grpc_requests_total{method,code}`` and ``kiln_grpc_request_duration_seconds{method}``,
  recorded by :class:`MetricsInterceptor` (the outermost interceptor, so it sees the status
  the error interceptor made of an exception); ``method`` is the full RPC name;
* for a capability service, the engines read at scrape time (:class:`EngineCollector`):
  ``kiln_engine_queue_depth{model}``, ``kiln_engine_running_jobs{model}`` and
  ``kiln_engine_state{model,state}`` (1 for the model's current state, 0 for the others);
* whatever a service adds to :attr:`ServiceMetrics.registry` (billing's credit counters,
  ``services.billing.metrics``).

With ``KILN_METRICS_PORT_OFFSET`` set, each service serves them over HTTP (``GET /metrics``,
Prometheus text format) on its gRPC port plus the offset, on the gRPC interface
(:func:`metrics_background`); off by default, since a fixed offset can clash with a port
already taken. Tests serve them on port 0 with :func:`start_metrics_server`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.engine import EnginePool, EngineState

#: Latency buckets (seconds) of calls: from a cached billing answer (~1 ms) to a video (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServiceMetrics:
    """One service's registry and its call metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_grpc_requests",
            "gRPC calls answered, by full method name and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kiln_grpc_request_duration_seconds",
            "Time from a call's start to its status, by full method name (a stream's whole length).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.duration.labels(method).observe(seconds)

    def add_engines(self, pool: EnginePool[Any]) -> None:
        """Reports ``pool``'s engines at every scrape."""
        self.registry.register(EngineCollector(pool))

    def exposition(self) -> bytes:
        """Every metric, in the Prometheus text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine gauges of one pool, read from :meth:`Engine.health` when scraped."""

    def __init__(self, pool: EnginePool[Any]) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "kiln_engine_queue_depth", "Jobs waiting for an engine slot.", labels=["model"]
        )
        running = GaugeMetricFamily("kiln_engine_running_jobs", "Jobs an engine runs now.", labels=["model"])
        state = GaugeMetricFamily(
            "kiln_engine_state",
            "1 for the load state a model's engine is in, 0 for the others.",
            labels=["model", "state"],
        )
        for name, engine in self.pool.engines.items():
            health = engine.health()
            queue.add_metric([name], health.waiting_jobs)
            running.add_metric([name], health.running_jobs)
            for each in EngineState:
                state.add_metric([name, each.value], 1.0 if health.state is each else 0.0)
        for name in self.pool.unavailable:  # no engine could even be built
            for each in EngineState:
                state.add_metric([name, each.value], 1.0 if each is EngineState.UNAVAILABLE else 0.0)
        yield queue
        yield running
        yield state


def _code(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call (unary or streaming) by method and final status code."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(method, handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, handler.stream_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(method, handler.stream_stream))
        return handler

    def _unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        metrics = self.metrics

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Observed(metrics, method, context):
                return await behavior(request, context)

        return wrapper

    def _stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        metrics = self.metrics

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Observed(metrics, method, context):
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        return wrapper


class _Observed:
    """Times one call and counts it by its final status code (CANCELLED when the caller left,
    the aborted status, UNKNOWN for an unexpected error, else the context's code or OK)."""

    def __init__(self, metrics: ServiceMetrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics, self.method, self.context = metrics, method, context
        self.started = time.perf_counter()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None and issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        elif kind is not None and issubclass(kind, grpc.aio.AbortError):
            code = _code(self.context, "UNKNOWN")
        elif kind is not None and issubclass(kind, Exception):
            code = "UNKNOWN"
        else:
            code = _code(self.context, "OK")
        self.metrics.observe(self.method, code, time.perf_counter() - self.started)


def metrics_app(metrics: ServiceMetrics) -> web.Application:
    """An HTTP app answering ``GET /metrics`` with ``metrics`` in the Prometheus text format."""

    async def scrape(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def start_metrics_server(metrics: ServiceMetrics, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serves ``metrics`` on ``host:port`` (0: a free port); returns the runner and the bound port."""
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def metrics_background(
    metrics: ServiceMetrics, host: str, port: Callable[[], int]
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A job for :attr:`GrpcService.background`: serves ``metrics`` on ``host`` and the port
    ``port()`` gives once the server is bound, until the job is cancelled."""

    async def serve() -> None:
        runner, _ = await start_metrics_server(metrics, host, port())
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    return serve


def address_host(address: str) -> str:
    """The host of a ``host:port`` bind address (``[::]:50051`` -> ``::``; empty -> all)."""
    host = address.rpartition(":")[0].strip("[]")
    return host or "0.0.0.0"
