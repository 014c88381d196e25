"""Where generated files live until a client GETs them at ``/v1/media/{id}``.

Ids are 144 random bits (``secrets.token_urlsafe(18)``, 24 URL-safe
characters), so they cannot be guessed; the file's extension records its MIME
type. Files are immutable once written (written to a temporary name, then
renamed), which makes them safe to cache. A write that fails (a full disk)
removes its partial temporary file; the ones a crash leaves behind are removed
by the retention sweep (``edge.retention``), which also deletes files by id
(:meth:`LocalMediaStore.delete`) and lists them with their age (:meth:`LocalMediaStore.files`).

The edge uses a store only through :class:`MediaStore`; :class:`LocalMediaStore` is the
embedded default and ``edge.media_s3.S3MediaStore`` keeps the files in an S3-compatible
bucket (``KILN_MEDIA_BACKEND``; :func:`open_media_store` picks one from the settings).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from services.common.settings import Settings

#: MIME type <-> file extension for everything the media store holds.
MIME_EXTENSIONS: dict[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "audio/wav": ".wav",
    "audio/mpeg": ".mp3",
    "audio/flac": ".flac",
    "audio/opus": ".opus",
    "audio/aac": ".aac",
    "video/mp4": ".mp4",
    # stored answers replayed for an Idempotency-Key (edge.flow)
    "application/octet-stream": ".bin",
}
_EXTENSION_MIME = {ext: mime for mime, ext in MIME_EXTENSIONS.items()}
#: Files up to this size are written on the event loop (see put_async).
INLINE_WRITE_BYTES = 1024 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_-]{24}$")
_ID_RE = ID_RE
#: Suffix of a file being written (``.<id><ext>.tmp`` beside the file it becomes).
TEMP_SUFFIX = ".tmp"


#: Bytes per chunk when a file is read in pieces (open_async).
READ_CHUNK_BYTES = 256 * 1024
#: Files listed per thread hop (LocalMediaStore.files_async).
LIST_BATCH = 1000


@dataclass(frozen=True)
class StoredMedia:
    """A stored file as :meth:`MediaStore.get_async` finds it."""

    media_id: str
    #: The file on this machine's disk; None when it lives elsewhere (an S3 bucket).
    path: Path | None
    mime_type: str
    size: int = 0
    #: Last modified, Unix seconds.
    modified: float = 0.0
    #: The backend's entity tag (quoted, as HTTP sends it); "" when it has none.
    etag: str = ""
    #: Where the backend keeps it (the object key of a bucket); "" for a local file.
    key: str = ""


class MediaStoreError(OSError):
    """The media backend failed (unreachable, refused the credentials); a 500 for a request."""


class MediaStore(Protocol):
    """What the edge needs of a media store (every backend implements it)."""

    def new_id(self) -> str:
        """A fresh media id, for a file whose URL is announced before it is written (streams)."""
        ...

    async def put_async(self, data: bytes, mime_type: str, media_id: str | None = None) -> str:
        """Stores bytes (under ``media_id`` from :meth:`new_id`, or a new id); returns the id."""
        ...

    async def get_async(self, media_id: str) -> StoredMedia | None:
        """The stored file of an id (its type, size, age), or None for an unknown or malformed id."""
        ...

    async def read_async(self, media_id: str) -> bytes | None:
        """The whole file of an id, or None when there is none."""
        ...

    async def open_async(
        self, stored: StoredMedia, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of a file, in chunks; the read has begun when it returns
        (a missing file raises FileNotFoundError here, not while streaming)."""
        ...

    async def download_url(self, stored: StoredMedia) -> str | None:
        """A URL clients may fetch the file from directly (a presigned URL), or None when the
        edge serves it."""
        ...

    async def delete_async(self, media_id: str) -> bool:
        """Deletes the file of an id; False when there was none."""
        ...

    def files_async(self) -> AsyncIterator[tuple[str, str, float]]:
        """(media id, extension, last modified in Unix seconds) of every stored file."""
        ...

    async def remove_stale_temporaries_async(self, cutoff: float) -> int:
        """Deletes partial writes last modified before ``cutoff``; returns how many."""
        ...


def open_media_store(settings: Settings) -> MediaStore:
    """The media store the settings name (``KILN_MEDIA_BACKEND``)."""
    if settings.media_backend == "s3":
        from edge.media_s3 import S3MediaStore

        return S3MediaStore.from_settings(settings)
    return LocalMediaStore(settings.resolved_media_root)


class LocalMediaStore:
    """A media store on the local filesystem (the embedded default).

    The synchronous methods (``put``, ``get``, ``delete``, ``files``) are the implementation;
    the ``*_async`` ones are :class:`MediaStore`'s.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, media_id: str, ext: str) -> Path:
        return self.root / media_id[:2] / f"{media_id}{ext}"

    @staticmethod
    def new_id() -> str:
        """A fresh media id, for a file whose URL is announced before it is written (streams)."""
        return secrets.token_urlsafe(18)

    def put(self, data: bytes, mime_type: str, media_id: str | None = None) -> str:
        """Stores bytes (under ``media_id`` from :meth:`new_id`, or a new id) and returns the id."""
        ext = MIME_EXTENSIONS[mime_type]
        media_id = media_id or self.new_id()
        path = self._path(media_id, ext)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return media_id

    async def put_async(self, data: bytes, mime_type: str, media_id: str | None = None) -> str:
        """:meth:`put` without blocking the event loop on large files.

        Small files (most images) are written inline: a page-cache write of a
        few hundred kilobytes costs less than handing it to a thread.
        """
        if len(data) <= INLINE_WRITE_BYTES:
            return self.put(data, mime_type, media_id)
        return await asyncio.to_thread(self.put, data, mime_type, media_id)

    def get(self, media_id: str) -> StoredMedia | None:
        """The stored file for an id, or None for an unknown or malformed id."""
        if not _ID_RE.match(media_id):
            return None
        for ext, mime in _EXTENSION_MIME.items():
            path = self._path(media_id, ext)
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                return StoredMedia(media_id, path, mime, size=info.st_size, modified=info.st_mtime)
        return None

    async def get_async(self, media_id: str) -> StoredMedia | None:
        # A few stat calls: cheaper on the loop than a thread hop (as GET /v1/media always did).
        return self.get(media_id)

    async def read_async(self, media_id: str) -> bytes | None:
        stored = self.get(media_id)
        if stored is None or stored.path is None:
            return None
        try:
            return await asyncio.to_thread(stored.path.read_bytes)
        except FileNotFoundError:  # deleted meanwhile
            return None

    async def open_async(
        self, stored: StoredMedia, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        assert stored.path is not None
        fh = await asyncio.to_thread(open, stored.path, "rb")
        return _read_chunks(fh, start, stored.size if end is None else end)

    async def download_url(self, stored: StoredMedia) -> str | None:
        return None  # served by the edge (FileResponse: ranges, conditional GET)

    def delete(self, media_id: str) -> bool:
        """Deletes the file of an id (any extension); False when there was none."""
        if not _ID_RE.match(media_id):
            return False
        deleted = False
        for ext in _EXTENSION_MIME:
            try:
                self._path(media_id, ext).unlink()
                deleted = True
            except FileNotFoundError:
                pass
        return deleted

    async def delete_async(self, media_id: str) -> bool:
        return await asyncio.to_thread(self.delete, media_id)

    async def files_async(self) -> AsyncIterator[tuple[str, str, float]]:
        files = self.files()
        while batch := await asyncio.to_thread(_take, files, LIST_BATCH):
            for entry in batch:
                yield entry

    async def remove_stale_temporaries_async(self, cutoff: float) -> int:
        return await asyncio.to_thread(self.remove_stale_temporaries, cutoff)

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        """Every regular file of the store's shard folders (``<root>/<2 chars>/``)."""
        with os.scandir(self.root) as shards:
            folders = [entry.path for entry in shards if entry.is_dir(follow_symlinks=False)]
        for folder in folders:
            try:
                with os.scandir(folder) as files:
                    yield from (entry for entry in files if entry.is_file(follow_symlinks=False))
            except FileNotFoundError:  # removed meanwhile
                continue

    def files(self) -> Iterator[tuple[str, str, float]]:
        """(media id, extension, last modified in Unix seconds) of every stored file."""
        for entry in self._entries():
            media_id, ext = os.path.splitext(entry.name)
            if ext in _EXTENSION_MIME and _ID_RE.match(media_id):
                yield media_id, ext, _mtime(entry)

    def remove_stale_temporaries(self, cutoff: float) -> int:
        """Deletes partial writes (``*.tmp``) last modified before ``cutoff``; returns how many."""
        removed = 0
        for entry in self._entries():
            if entry.name.endswith(TEMP_SUFFIX) and _mtime(entry) < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:  # removed meanwhile: never "old"
        return float("inf")


def _take(items: Iterator[tuple[str, str, float]], count: int) -> list[tuple[str, str, float]]:
    return [item for _, item in zip(range(count), items, strict=False)]


async def _read_chunks(fh: Any, start: int, end: int) -> AsyncIterator[bytes]:
    try:
        await asyncio.to_thread(fh.seek, start)
        left = end - start
        while left > 0:
            chunk = await asyncio.to_thread(fh.read, min(READ_CHUNK_BYTES, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        fh.close()
