"""Media retention and the disk guard: the media root never fills up with files nobody may fetch.

**Retention** (:class:`MediaSweeper`, run every ``media_sweep_seconds`` by the edge, which
owns the media store, the media root or an S3 bucket alike (``edge.media_store.MediaStore``:
it lists files with their last-modified times and deletes them by id); the records are
billing's, reached with its ``SweepMedia`` RPC):

1. *Expired files*: billing deletes the records of files older than ``media_ttl_seconds``
   (7 days by default: the contract's links expire after 7 days), except the library's
   (:data:`LIBRARY_KINDS`: the videos of ``/v1/images/user-videos``, kept while their account
   exists), and returns their ids; the sweep then deletes the files. Record first, file second:
   a crash in between leaves a file without a record, which step 2 removes, never a record
   that points at a missing file.
2. *Unpaid files*: every file is stored before its request is committed (``edge.flow``); a
   request that fails or is released deletes its files at once, and a file left by a crash
   has no record. Files older than :func:`orphan_grace_seconds` (longer than a credit hold
   lives, so no commit can still record them) that billing knows no record of (nor an
   idempotency key's stored answer) are deleted. Each file is checked once it is old enough
   (all of them on the first sweep after the edge starts).
3. *Stored answers* (``.bin``, replayed for an ``Idempotency-Key``) go once their key has
   expired (:data:`ANSWER_TTL_SECONDS`), and *partial writes* (``*.tmp``) after
   :data:`STALE_TEMP_SECONDS`.

**Disk guard** (:class:`DiskGuard`): before a paid request is authorized, the free space of
the disks holding the media root and a SQLite database is compared with
``min_free_disk_bytes`` (one ``statvfs`` per disk, cached for a second); below it the request
is refused with a 503 (:class:`~services.common.errors.LowDiskSpace`) and nothing is held.
Free routes (``GET``, ``/healthz``) keep working.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from edge.clients import BillingClient
from edge.keys import MEDIA, SETTINGS, UPSTREAMS
from edge.media_store import MIME_EXTENSIONS, MediaStore
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.common.errors import KilnError, LowDiskSpace
from services.common.settings import Settings

log = logging.getLogger("kiln.edge.retention")

#: Media record kinds kept while their account exists: the video library (edge.handlers.video).
LIBRARY_KINDS = ("video",)
#: Media record kind of every other file a paid request produced (edge.flow records them all).
OUTPUT_KIND = "output"
#: Past the capability deadline, a credit hold lives 120 s more (edge.flow.HOLD_MARGIN_SECONDS);
#: a file without a record is left alone for this much longer still.
ORPHAN_MARGIN_SECONDS = 600
#: A stored answer lives as long as its idempotency key (services.billing.ledger.IDEMPOTENCY_TTL_SECONDS).
ANSWER_TTL_SECONDS = 24 * 3600
ANSWER_EXTENSION = MIME_EXTENSIONS["application/octet-stream"]
#: Partial writes (``*.tmp``) older than this are left over from a crash.
STALE_TEMP_SECONDS = 3600
#: Ids per SweepMedia call (billing's limit is 1000).
SWEEP_BATCH = 500
#: A file modified this long before the last checked cutoff is checked again (clock steps, mtime granularity).
RECHECK_SECONDS = 60.0
#: How long a disk's free space is remembered.
DISK_CACHE_SECONDS = 1.0


def orphan_grace_seconds(settings: Settings) -> int:
    """Age after which a file without a record can no longer get one: longer than any hold lives."""
    return math.ceil(settings.service_timeout_seconds) + ORPHAN_MARGIN_SECONDS


class MediaSweeper:
    """Deletes expired, unpaid and stale temporary files of the media store (see the module)."""

    def __init__(
        self,
        store: MediaStore,
        billing: BillingClient,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.billing = billing
        self.ttl_seconds = settings.media_ttl_seconds
        self.grace_seconds = orphan_grace_seconds(settings)
        self.interval_seconds = settings.media_sweep_seconds
        self.clock = clock
        #: Files modified before this (Unix s) were checked for a record already.
        self._checked_until = 0.0

    async def run_forever(self) -> None:
        """Sweeps every ``media_sweep_seconds`` until cancelled (the first one after the first interval)."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.run_once()
            except KilnError as err:  # billing unreachable or restarting
                log.warning("media sweep skipped: %s", err.message)
            except Exception:
                log.exception("media sweep failed; retrying next round")

    async def run_once(self, now: float | None = None) -> dict[str, int]:
        """One sweep; returns how many files of each sort it deleted."""
        now = self.clock() if now is None else now
        expired = await self._expire(now)
        cutoff = now - self.grace_seconds
        since = max(0.0, self._checked_until - RECHECK_SECONDS)
        candidates, old_answers = await self._scan(since, cutoff, now - ANSWER_TTL_SECONDS)
        unpaid = 0
        for start in range(0, len(candidates), SWEEP_BATCH):
            reply = await self._sweep(now, limit=1, candidates=candidates[start : start + SWEEP_BATCH])
            expired += await self._delete(reply.expired_media_ids)
            unpaid += await self._delete(reply.unrecorded_media_ids)
        self._checked_until = max(self._checked_until, cutoff)
        answers = await self._delete(old_answers)
        temporaries = await self.store.remove_stale_temporaries_async(now - STALE_TEMP_SECONDS)
        counts = {"expired": expired, "unpaid": unpaid, "answers": answers, "temporaries": temporaries}
        if any(counts.values()):
            log.info("media sweep deleted %s", ", ".join(f"{n} {what}" for what, n in counts.items()))
        return counts

    async def _expire(self, now: float) -> int:
        """Expires records past the TTL, a batch at a time, and deletes their files."""
        deleted = 0
        while True:
            reply = await self._sweep(now, limit=SWEEP_BATCH, candidates=())
            deleted += await self._delete(reply.expired_media_ids)
            if len(reply.expired_media_ids) < SWEEP_BATCH:
                return deleted

    async def _sweep(
        self, now: float, *, limit: int, candidates: Sequence[str]
    ) -> billing_pb.SweepMediaResponse:
        request = billing_pb.SweepMediaRequest(
            created_before_ms=int((now - self.ttl_seconds) * 1000),
            keep_kinds=LIBRARY_KINDS,
            limit=limit,
            candidate_media_ids=candidates,
        )
        return await self.billing.sweep_media(request, "media-sweep")

    async def _delete(self, media_ids: Sequence[str]) -> int:
        deleted = 0
        for media_id in media_ids:
            try:
                deleted += await self.store.delete_async(media_id)
            except OSError as err:  # left for an operator; the next edge start checks it again
                log.warning("media sweep could not delete %s: %s", media_id, err)
        return deleted

    async def _scan(self, since: float, cutoff: float, answers_cutoff: float) -> tuple[list[str], list[str]]:
        """Files to check for a record (modified in [since, cutoff): old enough, not checked
        yet) and stored answers older than ``answers_cutoff``; one pass over the store."""
        candidates: list[str] = []
        answers: list[str] = []
        async for media_id, ext, mtime in self.store.files_async():
            if ext == ANSWER_EXTENSION:
                if mtime < answers_cutoff:
                    answers.append(media_id)
            elif since <= mtime < cutoff:
                candidates.append(media_id)
        return candidates, answers


class DiskGuard:
    """Refuses new paid work (503) while a guarded disk has less than ``min_free_bytes`` free."""

    def __init__(
        self,
        paths: Sequence[Path],
        min_free_bytes: int,
        *,
        cache_seconds: float = DISK_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = list(dict.fromkeys(_existing(Path(p)) for p in paths))
        self.min_free_bytes = min_free_bytes
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._checked: tuple[float, int] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DiskGuard:
        """Guards the media root (the data folder when media live in a bucket, whose space is
        its provider's) and, for SQLite, the database's folder (a PostgreSQL server's disk is
        its operator's to watch)."""
        paths = [settings.resolved_media_root if settings.media_backend == "local" else settings.data_dir]
        url = settings.resolved_database_url
        if url.startswith("sqlite:///"):
            paths.append(Path(url.removeprefix("sqlite:///")).parent)
        return cls(paths, settings.min_free_disk_bytes)

    def free_bytes(self) -> int:
        """The least free space of the guarded disks (cached for ``cache_seconds``)."""
        now = self.clock()
        if self._checked is not None and 0 <= now - self._checked[0] < self.cache_seconds:
            return self._checked[1]
        free = min(shutil.disk_usage(path).free for path in self.paths)
        self._checked = (now, free)
        return free

    def check(self) -> None:
        """Raises LowDiskSpace when a guarded disk is below the threshold (0 turns it off)."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise LowDiskSpace()


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (disk_usage needs an existing path)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


SWEEPER = web.AppKey("media_sweeper", MediaSweeper)
DISK_GUARD = web.AppKey("disk_guard", DiskGuard)


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """The edge's cleanup context (after the upstreams'): the media sweep runs in the
    background while the edge runs."""
    sweeper = MediaSweeper(app[MEDIA], app[UPSTREAMS].billing, app[SETTINGS])
    app[SWEEPER] = sweeper
    task = asyncio.create_task(sweeper.run_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
