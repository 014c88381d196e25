"""Where generated files live until a client GETs them at ``/v1/media/{id}``.

Ids are 144 random bits (``secrets.token_urlsafe(18)``, 24 URL-safe
characters), so they cannot be guessed; the file's extension records its MIME
type. Files are immutable once written (written to a temporary name, then
renamed), which makes them safe to cache.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

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
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{24}$")


@dataclass(frozen=True)
class StoredMedia:
    media_id: str
    path: Path
    mime_type: str


class LocalMediaStore:
    """A media store on the local filesystem (the embedded default)."""

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
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
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
            if path.is_file():
                return StoredMedia(media_id, path, mime)
        return None
