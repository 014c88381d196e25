"""``create_app(settings) -> web.Application``: the edge, wired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edge.clients import Upstreams
from edge.keys import MEDIA, PENDING, REGISTRY, SETTINGS, UPSTREAMS, PendingReleases
from edge.media_store import LocalMediaStore
from edge.middlewares import error_envelope, request_context
from edge.routes import setup_routes
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


def create_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """The edge application; gRPC channels open on startup and close on cleanup."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[request_context, error_envelope],
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry or load_registry(settings.registry_path)
    app[MEDIA] = LocalMediaStore(settings.resolved_media_root)
    app.cleanup_ctx.append(_upstreams)
    setup_routes(app)
    return app


def create_runner(settings: Settings, **kwargs: Any) -> web.AppRunner:
    """The edge app's runner. Handlers are cancelled when their client disconnects, so an
    abandoned request stops its upstream work (the gRPC call is cancelled) and its credit
    hold is released instead of charged.

    Graceful shutdown (``runner.cleanup()``, which ``kiln`` runs on SIGTERM): the
    listener closes, in-flight requests get ``grace_seconds`` to finish, the rest are
    cancelled (their holds released), and only then do the gRPC channels close.
    ``kwargs`` go to :class:`aiohttp.web.AppRunner`."""
    kwargs.setdefault("shutdown_timeout", settings.grace_seconds)
    return web.AppRunner(create_app(settings), handler_cancellation=True, **kwargs)
