"""Where generated files live until a client GETs them at ``/v1/media/{id}``.

Ids are 144 random bits (``secrets.token_urlsafe(18)``, 24 URL-safe
characters), so they cannot be guessed; the file's extension records its MIME
type. Files are immutable once written (written to a temporary name, then
renamed), which makes them safe to cache. A write that fails (a full disk)
removes its partial temporary file; the ones a crash leaves behind are removed
by the retention sweep (``edge.retention``), which also deletes files by id
(:meth:`LocalMediaStore.delete`) and lists them with their age (:meth:`LocalMediaStore.files`).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import Iterator
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
#: Suffix of a file being written (``.<id><ext>.tmp`` beside the file it becomes).
TEMP_SUFFIX = ".tmp"


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
            if path.is_file():
                return StoredMedia(media_id, path, mime)
        return None

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
