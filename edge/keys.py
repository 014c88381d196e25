"""Typed application state of the edge."""

from __future__ import annotations

from aiohttp import web

from edge.clients import Upstreams
from edge.media_store import LocalMediaStore
from services.common.registry import Registry
from services.common.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
MEDIA = web.AppKey("media", LocalMediaStore)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
#: Per-request id (``X-Request-ID`` or a new one), set by the request middleware.
REQUEST_ID = web.RequestKey("request_id", str)
