"""Typed application state of the edge."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

from edge.clients import Upstreams
from edge.media_store import MediaStore
from services.common.registry import Registry
from services.common.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
#: The media store (edge.media_store.MediaStore: local disk or an S3 bucket).
MEDIA = web.AppKey[MediaStore]("media")
UPSTREAMS = web.AppKey("upstreams", Upstreams)
#: Per-request id (``X-Request-ID`` or a new one), set by the request middleware.
REQUEST_ID = web.RequestKey("request_id", str)


class PendingReleases:
    """Releases of credit holds still running; the edge waits for them before closing its channels."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Future[None]] = set()

    def add(self, task: asyncio.Future[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self, seconds: float) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=seconds)


PENDING = web.AppKey("pending_releases", PendingReleases)


class BodyDigest:
    """SHA-256 of a multipart body's parts as they were read (for the Idempotency-Key fingerprint)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._sha.update(data)

    def digest(self) -> bytes:
        return self._sha.digest()


BODY_DIGEST = web.RequestKey("body_digest", BodyDigest)
