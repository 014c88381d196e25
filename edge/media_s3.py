"""The media store in an S3-compatible bucket (``KILN_MEDIA_BACKEND=s3``): AWS S3, SeaweedFS,
MinIO, Ceph RGW, R2.

Every call goes through ``obstore`` (Rust's ``object_store``; native asyncio, SigV4, presigning),
so nothing blocks the event loop. A file of id ``I`` and extension ``.E`` is the object
``<prefix>/I/I.E``: the id is a folder of its own, so one list request under it finds the
file and its type (S3 lists by prefix; ``object_store`` lists by path segment), and the key
still ends with a proper file name. An object is written by one PUT (never multipart), so a
failed write leaves nothing behind and there are no partial uploads to clean up.

``GET /v1/media/{id}`` (``edge.handlers.media``) either streams the object through the edge
(ranges are passed to S3's GetObject) or, with ``KILN_MEDIA_S3_REDIRECT=true``, answers with a
307 to a presigned URL valid for ``KILN_S3_PRESIGN_SECONDS``. The retention sweep lists the
objects with their last-modified times like the files of the local store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from edge.media_store import (
    _EXTENSION_MIME,
    ID_RE,
    MIME_EXTENSIONS,
    READ_CHUNK_BYTES,
    LocalMediaStore,
    MediaStoreError,
    StoredMedia,
)
from services.common.settings import Settings

T = TypeVar("T")

#: A stalled connection or an unreachable endpoint fails a request within seconds, not after
#: object_store's defaults (10 retries over 3 minutes). ``timeout`` bounds a whole request,
#: body included: a streamed video to a slow client needs far more than the default 30 s, so
#: stalls are caught by ``read_timeout`` (between two reads) instead.
CLIENT_OPTIONS: dict[str, Any] = {
    "connect_timeout": timedelta(seconds=5),
    "read_timeout": timedelta(seconds=30),
    "timeout": timedelta(hours=1),
}
RETRY_CONFIG: dict[str, Any] = {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}


class S3MediaStore:
    """A :class:`~edge.media_store.MediaStore` in one bucket, under one key prefix."""

    def __init__(
        self,
        store: S3Store,
        *,
        prefix: str = "media",
        presign_seconds: int = 3600,
        redirect: bool = False,
    ) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.presign_seconds = presign_seconds
        self.redirect = redirect

    @classmethod
    def from_settings(cls, settings: Settings) -> S3MediaStore:
        if not settings.s3_bucket:
            raise ValueError("KILN_MEDIA_BACKEND=s3 needs a bucket: set KILN_S3_BUCKET.")
        config: dict[str, Any] = {"region": settings.s3_region}
        if settings.s3_endpoint:
            config["endpoint"] = settings.s3_endpoint
        if settings.s3_access_key_id:
            config["access_key_id"] = settings.s3_access_key_id
        if settings.s3_secret_access_key is not None:
            config["secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
        options = dict(CLIENT_OPTIONS)
        if (settings.s3_endpoint or "").startswith("http://"):
            options["allow_http"] = True
        store = S3Store(settings.s3_bucket, config=config, client_options=options, retry_config=RETRY_CONFIG)  # type: ignore[arg-type]
        return cls(
            store,
            prefix=settings.s3_prefix,
            presign_seconds=settings.s3_presign_seconds,
            redirect=settings.media_s3_redirect,
        )

    # --- keys ---
    def _folder(self, media_id: str) -> str:
        return f"{self.prefix}/{media_id}" if self.prefix else media_id

    def _key(self, media_id: str, ext: str) -> str:
        return f"{self._folder(media_id)}/{media_id}{ext}"

    def _parse(self, key: str) -> tuple[str, str] | None:
        """(media id, extension) of a key of this store, or None for any other object."""
        if self.prefix:
            if not key.startswith(self.prefix + "/"):
                return None
            key = key[len(self.prefix) + 1 :]
        folder, _, name = key.partition("/")
        media_id, dot, ext = name.partition(".")
        if not ID_RE.match(folder) or media_id != folder or not dot or f".{ext}" not in _EXTENSION_MIME:
            return None
        return media_id, f".{ext}"

    # --- MediaStore ---
    @staticmethod
    def new_id() -> str:
        return LocalMediaStore.new_id()

    async def put_async(self, data: bytes, mime_type: str, media_id: str | None = None) -> str:
        ext = MIME_EXTENSIONS[mime_type]
        media_id = media_id or self.new_id()
        await _call(
            obstore.put_async,
            self.store,
            self._key(media_id, ext),
            data,
            attributes={"Content-Type": mime_type},
            use_multipart=False,
        )
        return media_id

    async def get_async(self, media_id: str) -> StoredMedia | None:
        if not ID_RE.match(media_id):
            return None
        for meta in await self._objects(media_id):
            parsed = self._parse(meta["path"])
            if parsed is not None:
                return StoredMedia(
                    media_id,
                    None,
                    _EXTENSION_MIME[parsed[1]],
                    size=meta["size"],
                    modified=meta["last_modified"].timestamp(),
                    etag=meta.get("e_tag") or "",
                    key=meta["path"],
                )
        return None

    async def read_async(self, media_id: str) -> bytes | None:
        stored = await self.get_async(media_id)
        if stored is None:
            return None
        try:
            result = await _call(obstore.get_async, self.store, stored.key)
            return bytes(await _call(result.bytes_async))
        except FileNotFoundError:  # deleted meanwhile
            return None

    async def open_async(
        self, stored: StoredMedia, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        end = stored.size if end is None else end
        if end <= start:  # S3 refuses an empty range
            return _chunks(None)
        options: dict[str, Any] = {}
        if (start, end) != (0, stored.size):
            options["range"] = (start, end)
        result = await _call(obstore.get_async, self.store, stored.key, options=options)  # type: ignore[arg-type]
        return _chunks(result.stream(min_chunk_size=READ_CHUNK_BYTES))

    async def download_url(self, stored: StoredMedia) -> str | None:
        if not self.redirect:
            return None
        expires = timedelta(seconds=self.presign_seconds)
        return await _call(obstore.sign_async, self.store, "GET", stored.key, expires)

    async def delete_async(self, media_id: str) -> bool:
        if not ID_RE.match(media_id):
            return False
        keys = [meta["path"] for meta in await self._objects(media_id)]
        for key in keys:
            await _call(obstore.delete_async, self.store, key)
        return bool(keys)

    async def files_async(self) -> AsyncIterator[tuple[str, str, float]]:
        try:
            async for batch in obstore.list(self.store, prefix=self.prefix or None, chunk_size=1000):
                for meta in batch:
                    parsed = self._parse(meta["path"])
                    if parsed is not None:
                        yield parsed[0], parsed[1], meta["last_modified"].timestamp()
        except BaseError as err:
            raise MediaStoreError(f"The media bucket could not be listed: {err}") from err

    async def remove_stale_temporaries_async(self, cutoff: float) -> int:
        return 0  # one PUT per object: a failed write leaves nothing

    async def _objects(self, media_id: str) -> list[Any]:
        """Every object under the id's folder (one list request)."""
        found: list[Any] = []
        try:
            async for batch in obstore.list(self.store, prefix=self._folder(media_id)):
                found.extend(batch)
        except BaseError as err:
            raise MediaStoreError(f"The media bucket could not be listed: {err}") from err
        return found


async def _call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """An obstore call whose failures are :class:`MediaStoreError` (a missing object stays
    FileNotFoundError; obstore's NotFoundError is one)."""
    try:
        return await fn(*args, **kwargs)
    except FileNotFoundError:
        raise
    except BaseError as err:
        raise MediaStoreError(f"The media bucket refused a request: {err}") from err


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    if stream is None:
        return
    try:
        async for chunk in stream:
            yield bytes(chunk)
    except BaseError as err:
        raise MediaStoreError(f"Reading from the media bucket failed: {err}") from err
