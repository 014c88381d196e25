"""Untrusted video is demuxed and decoded in a worker process of its own, one per job.

The same isolation as :mod:`services.common.decoding` (a native crash in FFmpeg
kills a worker, never the service), for a file that arrives while it is being
read: the upload is spooled by the service (``services.segmentation.video``),
and the worker reads it through the parent. :class:`IsolatedVideo` starts a
``spawn`` worker (a fresh interpreter: no torch, no gRPC, the worker limits of
:mod:`services.common.decoding`), and on the job's thread answers the worker's
reads (``read``/``seek`` of its file object become messages on a pipe, and a
read blocks, as before, until the bytes have arrived) until the worker sends
what was asked: the :class:`VideoProbe` once, then batches of RGB frames. A
worker that dies is :class:`~services.common.errors.InvalidRequest` for that
job only; a worker is stopped when its job ends, however it ends.

:func:`open_video` and :func:`iter_frames` are what the worker runs: the
container (MP4/MOV or Matroska/WebM only) opened and checked against the
model's limits (see :func:`open_video`), then at most ``probe.frames`` frames
of the probe's size.
"""

from __future__ import annotations

import io
import math
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

import av
from PIL import Image

from services.common.decoding import (
    CRASH_MESSAGE,
    DEFAULT_DECODE_CPU_SECONDS,
    DEFAULT_DECODE_MEMORY_BYTES,
    START_METHOD,
    cpu_budget,
    start_worker,
)
from services.common.errors import InvalidRequest
from services.common.registry import ModelLimits

#: FFmpeg demuxers accepted (MP4 / MOV family, Matroska / WebM).
ACCEPTED_DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


class UploadAborted(Exception):
    """Raised in a blocked reader once the job is over (client gone, error)."""


@dataclass(frozen=True)
class VideoProbe:
    """What the container says of a video; ``frames`` is an upper bound on the frames processed."""

    frames: int
    frame_rate: Fraction
    width: int
    height: int
    #: 0 when the container does not say.
    duration_seconds: float
    #: Where ``frames`` comes from: "container", "duration" or "limit".
    frames_source: str


def open_video(file: Any, limits: ModelLimits) -> tuple[Any, VideoProbe]:
    """Opens an untrusted video (blocking) and checks it against ``limits``; the container and its probe."""
    try:
        container = av.open(file, "r", options={"fflags": "+ignidx"})
    except UploadAborted:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise InvalidRequest(
            "The file is not a readable video (MP4, MOV or WebM); it may be truncated or corrupt."
        ) from exc
    try:
        probe = _probe(container, limits)
    except BaseException:
        container.close()
        raise
    return container, probe


def _probe(container: Any, limits: ModelLimits) -> VideoProbe:
    if container.format.name not in ACCEPTED_DEMUXERS:
        raise InvalidRequest(f"Unsupported video container '{container.format.name}'; send MP4, MOV or WebM")
    if not container.streams.video:
        raise InvalidRequest("The file has no video stream")
    stream = container.streams.video[0]
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise InvalidRequest("The video stream has no picture size")
    if width > limits.max_width or height > limits.max_height:
        raise InvalidRequest(
            f"The video is {width}x{height} pixels; the maximum is {limits.max_width}x{limits.max_height}"
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise InvalidRequest("The video stream has no frame rate")
    rate = Fraction(rate)
    duration = 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    if limits.max_duration_seconds and duration > limits.max_duration_seconds:
        raise InvalidRequest(
            f"The video is {duration:.1f} seconds long; the maximum is {limits.max_duration_seconds:g} seconds"
        )
    if stream.frames and stream.frames > 0:
        frames, source = int(stream.frames), "container"
    elif duration > 0:
        frames, source = math.ceil(duration * rate - 1e-6), "duration"
    else:
        frames, source = limits.max_frames, "limit"
    if frames > limits.max_frames:
        raise InvalidRequest(f"The video has {frames} frames; the maximum is {limits.max_frames} frames")
    if frames <= 0:
        raise InvalidRequest("The video has no frames")
    return VideoProbe(frames, rate, width, height, duration, source)


def iter_frames(container: Any, probe: VideoProbe) -> Iterator[Image.Image]:
    """The video's frames as RGB images of the probe's size, at most ``probe.frames`` of them (blocking)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    count = 0
    try:
        for frame in container.decode(stream):
            if count >= probe.frames:
                return
            if frame.width != probe.width or frame.height != probe.height:
                frame = frame.reformat(width=probe.width, height=probe.height)
            count += 1
            yield frame.to_image()
    except UploadAborted:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise InvalidRequest(f"The video could not be decoded after frame {count}: {exc}") from exc


# --- the worker process ---


class _Stopped(Exception):
    """The parent ended the job while the worker waited for bytes."""


class PositionalReader:
    """A read-only, seekable file object (what PyAV reads) over a source that reads at a
    position and may not know its size yet: :meth:`_read_at` and :meth:`_size`."""

    def __init__(self) -> None:
        self._position = 0

    def _read_at(self, position: int, size: int) -> bytes:
        raise NotImplementedError

    def _size(self) -> int | None:
        """The source's size, or None while it is still unknown."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._read_at(self._position, size)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Moves the position; relative to the end only once the size is known (else -1: unknown)."""
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._position + offset
        elif whence == io.SEEK_END:
            size = self._size()
            if size is None:
                return -1  # FFmpeg's "size unknown": it reads on instead of jumping to the end
            target = size + offset
        else:
            return -1
        if target < 0:
            return -1
        self._position = target
        return target

    def tell(self) -> int:
        return self._position


class _RemoteReader(PositionalReader):
    """The worker's file object: reads and the size come from the parent, over the pipe."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn

    def _read_at(self, position: int, size: int) -> bytes:
        self._conn.send(("read", position, size))
        kind, data = self._conn.recv()
        if kind != "data":
            raise _Stopped
        return bytes(data)

    def _size(self) -> int | None:
        self._conn.send(("size",))
        kind, size = self._conn.recv()
        if kind != "size":
            raise _Stopped
        return cast("int | None", size)


def video_worker(conn: Any, limits: ModelLimits, memory_bytes: int, cpu_seconds: int) -> None:
    """The worker's life: probe, then a batch of frames per ``("frames", n)`` until told to stop."""
    start_worker(memory_bytes)
    try:
        cpu_budget(cpu_seconds)
        container, probe = open_video(_RemoteReader(conn), limits)
        conn.send(("probe", probe))
        frames = iter_frames(container, probe)
        while True:
            command = conn.recv()
            if command[0] != "frames":
                return
            cpu_budget(cpu_seconds)
            conn.send(("frames", [image for _, image in zip(range(command[1]), frames, strict=False)]))
    except InvalidRequest as exc:
        conn.send(("error", InvalidRequest(exc.message)))
    except MemoryError:
        conn.send(("error", InvalidRequest("The video needs more memory to decode than is allowed")))
    except (_Stopped, EOFError, BrokenPipeError):
        return


# --- the service's side ---


class IsolatedVideo:
    """A video read by a worker process from ``source`` (a blocking, seekable file object).

    Blocking calls, all on one thread (the job's): :meth:`probe` once, then
    :meth:`frames` until it returns an empty list; :meth:`close` always. An
    exception of ``source`` (the upload aborted) stops the worker and is raised.
    """

    def __init__(
        self,
        source: Any,
        limits: ModelLimits,
        *,
        memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES,
        cpu_seconds: int = DEFAULT_DECODE_CPU_SECONDS,
        worker: Callable[[Any, ModelLimits, int, int], None] | None = None,
    ) -> None:
        """``worker`` replaces the worker's main function (tests: one that crashes)."""
        context = multiprocessing.get_context(START_METHOD)
        self._source = source
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(
            target=worker or video_worker,
            args=(child, limits, memory_bytes, cpu_seconds),
            name="kiln-video-decode",
            daemon=True,
        )
        self._process.start()
        child.close()  # the worker's end: when the worker dies, our reads see the end of the pipe
        self._closed = False

    def probe(self) -> VideoProbe:
        probe: VideoProbe = self._serve_until("probe")
        return probe

    def frames(self, count: int) -> list[Image.Image]:
        """Up to ``count`` more frames (fewer, or none, at the end of the video or of the bound)."""
        self._conn.send(("frames", count))
        frames: list[Image.Image] = self._serve_until("frames")
        return frames

    def _serve_until(self, expected: str) -> Any:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self.close()
                raise InvalidRequest(CRASH_MESSAGE.format(what="The video")) from None
            kind = message[0]
            if kind == "read":
                _, position, size = message
                try:
                    self._source.seek(position)
                    data = self._source.read(size)
                except BaseException:
                    self.close()
                    raise
                self._conn.send(("data", data))
            elif kind == "size":
                position = self._source.tell()
                size = self._source.seek(0, io.SEEK_END)
                self._source.seek(position)
                self._conn.send(("size", None if size < 0 else size))
            elif kind == "error":
                self.close()
                raise message[1]
            elif kind == expected:
                return message[1]
            else:
                self.close()
                raise InvalidRequest(CRASH_MESSAGE.format(what="The video"))

    def close(self) -> None:
        """Stops the worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout=1)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()
