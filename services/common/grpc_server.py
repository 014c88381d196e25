"""The standard bootstrap of every Kiln gRPC service.

``create_server`` builds a ``grpc.aio`` server with tracing, mesh credential
(:mod:`services.common.mesh_auth`) and error interceptors, reflection and the
standard health service (NOT_SERVING until the service says it is ready), bound
to a configured address; it returns the bound port, so tests bind port 0. ``ErrorInterceptor`` is the one place where
a :class:`~services.common.errors.KilnError` becomes a ``google.rpc.Status``
with an ``ErrorInfo`` whose reason is the contract's error type.
:meth:`EngineService.create` is the one builder of every capability server:
a capability's ``server.py`` declares only what differs (an :class:`EngineService`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from kiln.common.v1 import engine_status_service_pb2_grpc as engine_status_grpc
from services.common.admission import QueuePolicy, caller_from_metadata, caller_var
from services.common.capability import Capability
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.engine_status import SERVICE_NAME as ENGINE_STATUS_SERVICE
from services.common.engine_status import EngineStatusServicer
from services.common.errors import ERROR_DOMAIN, KilnError, ProcessingError
from services.common.mesh_auth import MeshAuthInterceptor, mesh_secret
from services.common.metrics import MetricsInterceptor, ServiceMetrics, address_host, metrics_background
from services.common.registry import Registry, load_registry
from services.common.servicer import ServiceParts
from services.common.settings import Settings
from services.common.telemetry import server_interceptors

log = logging.getLogger(__name__)

#: The caller's request id (gRPC metadata ``x-request-id``), for logs.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def to_status(err: KilnError) -> grpc.Status:
    """The rich gRPC status for a Kiln error."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(reason=err.error_type.value, domain=ERROR_DOMAIN, metadata=err.metadata)
    )
    code = grpc.StatusCode[err.mapping.grpc_code]
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=err.message, details=[detail]))


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, KilnError):
        err = exc
    else:
        log.exception("unhandled error in %s", request_id_var.get(), exc_info=exc)
        err = ProcessingError("Internal error while processing the request.")
    await context.abort_with_status(to_status(err))


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status; never leaks a traceback
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps KilnError (and anything unexpected) to rich statuses; sets the request id and the
    caller (``x-kiln-account`` / ``x-kiln-tier``) for the call's task."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "x-request-id":
                request_id_var.set(str(value))
        # Whom the engines' queues admit the call's jobs for (services.common.admission).
        caller_var.set(caller_from_metadata(handler_call_details.invocation_metadata))
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler


@dataclass
class GrpcService:
    """A built, bound (not yet started) gRPC server and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    #: Coroutines started as background tasks once the server listens
    #: (model loading, expiry sweeps); cancelled on stop.
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    #: Awaited after the server stopped (close pools, engines).
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: Its Prometheus metrics (calls, engines; :mod:`services.common.metrics`).
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.server.start()
        self._tasks = [asyncio.create_task(job()) for job in self.background]

    async def stop(self, grace: float) -> None:
        """Graceful shutdown: health says NOT_SERVING, in-flight calls get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self.cleanup:
            await job()


async def create_server(
    *,
    address: str,
    settings: Settings,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    restricted: Mapping[str, Iterable[str]] | None = None,
    metrics: ServiceMetrics | None = None,
) -> GrpcService:
    """Builds a server with the standard interceptors, reflection and health.

    ``register`` adds the capability's servicers; ``service_names`` are their
    full names (``kiln.image.v1.ImageService``). Health starts NOT_SERVING.
    Every call but health needs the mesh credential; ``restricted`` names the
    methods only some identities may call (see :class:`MeshAuthInterceptor`).
    Every call is counted in ``metrics`` (a new :class:`ServiceMetrics` when None), served
    over HTTP when ``metrics_port_offset`` is set.
    """
    metrics = metrics or ServiceMetrics()
    server = grpc.aio.server(
        interceptors=[
            MetricsInterceptor(metrics),  # outermost: sees the status the others made
            *server_interceptors(),
            MeshAuthInterceptor(mesh_secret(settings), restricted),
            ErrorInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC address {address}")
    service = GrpcService(server=server, port=port, health=health, service_names=names, metrics=metrics)
    if settings.metrics_port_offset:
        offset = settings.metrics_port_offset
        service.background.append(metrics_background(metrics, address_host(address), lambda: port + offset))
    await service.set_serving(False)
    return service


async def create_engine_server(
    *,
    address: str,
    settings: Settings,
    servicer: Any,
    add_to_server: Callable[[Any, grpc.aio.Server], None],
    service_name: str,
    pool: EnginePool,
    decoder: DecodePool | None = None,
) -> GrpcService:
    """The standard server for a capability whose servicer runs an engine pool: built by
    :func:`create_server`, with the engines loading once it listens (see :func:`serve_engine_pool`).
    Beside the capability's service it serves ``kiln.common.v1.EngineStatusService`` (the
    models' load states, for the edge's ``/readyz``), and its metrics report the engines."""

    def register(server: grpc.aio.Server) -> None:
        add_to_server(servicer, server)
        engine_status_grpc.add_EngineStatusServiceServicer_to_server(EngineStatusServicer(pool), server)

    service = await create_server(
        address=address,
        settings=settings,
        register=register,
        service_names=[service_name, ENGINE_STATUS_SERVICE],
    )
    service.metrics.add_engines(pool)
    if decoder is not None:  # its worker processes stop with the server
        service.cleanup.append(_closer(decoder))
    return serve_engine_pool(service, pool)


def _closer(decoder: DecodePool) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        decoder.close()

    return close


def serve_engine_pool(service: GrpcService, pool: EnginePool) -> GrpcService:
    """Loads the pool's engines once the server listens (health SERVING when the default
    model is ready) and closes them when it stops."""

    async def load_engines() -> None:
        await pool.load(on_default_ready=service.set_serving)

    service.background.append(load_engines)
    service.cleanup.append(pool.close)
    return service


@dataclass(frozen=True)
class EngineService:
    """Everything that differs between two capability servers: which catalog entry, how to
    register its servicer, its engine pool builder (called with the registry, the model
    cache, torch threads, the default model and ``pool_options(settings)``) and its
    servicer. The rest (registry, decode workers, address, interceptors, health, model
    loading, shutdown) is :meth:`create`'s, the one builder of every capability server."""

    capability: Capability
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    build_pool: Callable[..., EnginePool]
    default_model: str
    servicer: Callable[[ServiceParts[Any]], Any]
    pool_options: Callable[[Settings], dict[str, Any]] = lambda settings: {}

    async def create(
        self,
        settings: Settings,
        *,
        address: str | None = None,
        registry: Registry | None = None,
        pool: EnginePool | None = None,
    ) -> GrpcService:
        """A bound, not yet started server of this capability.

        ``registry`` defaults to ``settings.registry_path``, ``pool`` to the capability's own
        (tiny models built in ``settings.resolved_model_cache_dir``), ``address`` to where
        ``KILN_<NAME>_ADDRESS`` (and ``KILN_GRPC_BIND_HOST``) say. The engines load in the
        background once the server starts; they and the decode workers close in its cleanup.
        """
        registry = registry or load_registry(settings.registry_path)
        decoder = DecodePool.from_settings(settings)
        if pool is None:
            pool = self.build_pool(
                registry,
                cache_dir=settings.resolved_model_cache_dir,
                torch_threads=settings.torch_threads,
                default=self.default_model,
                **self.pool_options(settings),
            )
        pool.configure_queues(QueuePolicy.from_settings(settings))  # the engine_queue_* settings
        servicer = self.servicer(ServiceParts(registry, pool, decoder, settings))
        return await create_engine_server(
            address=address or settings.bind_address(settings.address(self.capability.name)),
            settings=settings,
            servicer=servicer,
            add_to_server=self.add_to_server,
            service_name=self.capability.service,
            pool=pool,
            decoder=decoder,
        )
