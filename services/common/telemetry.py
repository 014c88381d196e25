"""OpenTelemetry set-up: one tracer provider per process, gRPC interceptors both ways.

Trace context travels in gRPC metadata (W3C ``traceparent``), so a request's
spans from the edge, billing and image_gen share one trace.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from services.common.settings import Settings

log = logging.getLogger(__name__)


def tracing_enabled() -> bool:
    """Whether an SDK tracer provider is installed (else spans would be dropped unseen)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def setup_tracing(settings: Settings, service_name: str) -> None:
    """Installs the process's tracer provider (once; later calls keep the first).

    With ``KILN_OTEL_EXPORTER=none`` nothing is installed, and the gRPC tracing
    interceptors are left out too: spans nobody exports cost time on every call.
    """
    if tracing_enabled() or settings.otel_exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.otel_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.otel_exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning("KILN_OTEL_EXPORTER=otlp needs opentelemetry-exporter-otlp; spans are not exported")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor for a grpc.aio server (continues the caller's trace)."""
    return [aio_server_interceptor()] if tracing_enabled() else []


def client_interceptors() -> list[Any]:
    """Tracing interceptors for a grpc.aio channel (injects the trace context).

    Bidirectional calls are left out: the instrumentation's stream-stream
    interceptor leaves its request-iterator task pending when such a call is
    dropped after an error (asyncio then logs "Task was destroyed"). Their
    server side is still traced, as a trace of its own.
    """
    if not tracing_enabled():
        return []
    return [i for i in aio_client_interceptors() if not isinstance(i, grpc.aio.StreamStreamClientInterceptor)]


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
