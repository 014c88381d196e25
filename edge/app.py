"""``create_app(settings) -> web.Application``: the edge, wired."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edge.clients import Upstreams
from edge.keys import MEDIA, PENDING, REGISTRY, SETTINGS, UPSTREAMS, PendingReleases
from edge.media_store import open_media_store
from edge.metrics import METRICS, EdgeMetrics, record_metrics
from edge.middlewares import AUTHENTICATED_ROUTES, credential_first, error_envelope, request_context
from edge.ratelimit import setup_rate_limits
from edge.retention import DISK_GUARD, DiskGuard, retention_ctx
from edge.routes import ROUTES, setup_routes
from edge.tasks import announce_self, tasks_ctx
from edge.webhooks import webhooks_ctx
from services.common.registry import Registry, load_registry
from services.common.settings import Settings


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAMS] = Upstreams.connect(app[SETTINGS])
    app[PENDING] = PendingReleases()
    yield
    # Handlers still running at shutdown were cancelled; their holds are being
    # released: let that finish before the channels close.
    await app[PENDING].wait(app[SETTINGS].billing_timeout_seconds)
    await app[UPSTREAMS].close()


async def _freeze_startup_heap(app: web.Application) -> None:
    """Moves what exists at start (modules, settings, the registry, the routes: the process's
    lifetime objects) out of the garbage collector's reach (``gc.freeze``). A full collection
    then walks only what requests made since: on the loaded 2-core VM a full collection of the
    start-up heap held the event loop, and every request with it, for 120-250 ms."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """The edge application; gRPC channels open on startup and close on cleanup."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # record_metrics first: it sees every answer, the error envelope's too (edge.metrics)
        middlewares=[record_metrics, request_context, error_envelope, credential_first],
    )
    app[SETTINGS] = settings
    app[METRICS] = EdgeMetrics()
    app[AUTHENTICATED_ROUTES] = frozenset((r.method, r.path) for r in ROUTES if r.authenticated)
    app[REGISTRY] = registry or load_registry(settings.registry_path)
    app[MEDIA] = open_media_store(settings)  # KILN_MEDIA_BACKEND: the media root or a bucket
    app[DISK_GUARD] = DiskGuard.from_settings(settings)
    app.on_startup.append(_freeze_startup_heap)
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(retention_ctx)  # media retention (edge.retention), after the upstreams
    app.cleanup_ctx.append(webhooks_ctx)  # task webhook delivery (edge.webhooks), after the upstreams
    app.cleanup_ctx.append(tasks_ctx)  # the task worker (edge.tasks), after the upstreams
    setup_rate_limits(app, settings)  # the limiter client and the x-ratelimit-* headers (edge.ratelimit)
    setup_routes(app)
    return app


def create_runner(settings: Settings, **kwargs: Any) -> web.AppRunner:
    """The edge app's runner. Handlers are cancelled when their client disconnects, so an
    abandoned request stops its upstream work (the gRPC call is cancelled) and its credit
    hold is released instead of charged.

    Graceful shutdown (``runner.cleanup()``, which ``kiln`` runs on SIGTERM): the
    listener closes, in-flight requests get ``grace_seconds`` to finish, the rest are
    cancelled (their holds released), and only then do the gRPC channels close.
    Slow clients: a connection gets ``http_header_timeout_seconds`` to send a request's
    complete headers, from its start or the end of its previous request (aiohttp's keep-alive
    timer, which runs from the connection's start and is not reset by header bytes; an idle
    keep-alive connection is closed after it too); header lines, fields and count keep
    aiohttp's limits (8190 bytes, 8190 bytes, 128). Bodies are timed as they are read
    (``edge.forms.BodyClock``).

    ``kwargs`` go to :class:`aiohttp.web.AppRunner`."""
    kwargs.setdefault("shutdown_timeout", settings.grace_seconds)
    kwargs.setdefault("keepalive_timeout", settings.http_header_timeout_seconds)
    return web.AppRunner(create_app(settings), handler_cancellation=True, **kwargs)


async def start_edge(settings: Settings, host: str, port: int, **kwargs: Any) -> tuple[web.AppRunner, str]:
    """Starts the edge (:func:`create_runner`) listening on ``host:port`` (0: any free port);
    returns its runner and its URL, which its task worker replays tasks against."""
    runner = create_runner(settings, **kwargs)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        local = "127.0.0.1" if bound_host in ("0.0.0.0", "::", "") else bound_host
        url = f"http://{local if ':' not in local else f'[{local}]'}:{bound_port}"
        announce_self(runner.app, url)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, url
