"""Streaming video background removal: upload spool, probe, decode, segment, WebM VP9 with alpha.

The pieces, in the order a request uses them:

* :class:`UploadSpool` receives the upload chunk by chunk into a
  ``tempfile.SpooledTemporaryFile`` (memory up to :data:`SPOOL_MEMORY_BYTES`,
  then a temporary file on disk: memory stays flat in the video's length).
  Its :meth:`UploadSpool.reader` is a seekable file object for PyAV whose
  ``read`` blocks until more bytes arrived or the upload is complete, so
  demuxing starts as soon as the container header is there. The file's size
  is reported as unknown until the upload completes (FFmpeg then reads on
  instead of jumping to the end), and the MP4 demuxer runs with
  ``fflags=+ignidx`` so that a faststart MP4 (``moov`` first) opens without
  scanning to the end; an MP4 whose ``moov`` atom is at the end, or a WebM
  whose header points at elements at the end, simply waits there until the
  upload is complete.
* :func:`open_video` opens the container (MP4/MOV or Matroska/WebM only) and
  returns a :class:`VideoProbe`: size, frame rate, duration and an **upper
  bound** on the frame count (the container's frame count, else
  ``ceil(duration x fps)``, else the model's ``max_frames``). It refuses, with
  :class:`~services.common.errors.InvalidRequest`, anything that is not a
  readable video of those containers, a file without a video stream, and
  videos over the model's ``max_duration_seconds``, ``max_frames`` or
  ``max_width`` x ``max_height``.
* :class:`AlphaWebmEncoder` encodes RGBA frames as WebM, VP9 with alpha
  (``libvpx-vp9``, ``yuva420p``, ``auto-alt-ref=0``, no lag, realtime
  deadline), into a write-only sink: the Matroska muxer works on a
  non-seekable output (no cues, no duration rewrite), and with clusters of at
  most :data:`CLUSTER_MS` the bytes come out while frames are encoded and are
  handed out by :meth:`AlphaWebmEncoder.take`.
* :func:`remove_video_background` drives it all: an async generator that
  yields the :class:`VideoProbe` first and does nothing more until the
  consumer asks for the next event (the servicer asks only after the client's
  ``start``); then, per batch of frames, output bytes and a
  :class:`~services.common.runner.Progress`; last a :class:`VideoSummary`.

Decisions (documented for the edge and the README):

* **Output frames.** One output frame per input frame, at the input's
  average frame rate (constant rate, pts = frame index) and size. A frame
  where the object is found keeps its pixels where the mask is and is
  transparent (alpha 0) elsewhere. A frame where it is not found is
  **written fully transparent** (same colours, alpha 0 everywhere), so the
  output's frame count, rate and duration equal the input's; it counts as
  processed but not as a frame with an object (not charged).
* **Frame bound.** Never more frames than the probe's bound are decoded or
  processed; frames past it (a container that under-reported) are dropped.
* **Audio** is dropped: the output has one video stream only.
* **Errors.** Every bad input is ``InvalidRequest``: unreadable or truncated
  containers (an MP4 cut before its ``moov`` atom), no video stream, limits
  exceeded, and decoding failures (also after output started: the stream then
  ends with that error).

Demuxing and decoding the untrusted upload run in a worker process of the job's
own (:class:`services.common.video_decoding.IsolatedVideo`, where
:func:`open_video` and :func:`iter_frames` now live): a decoder crash is this
job's 400, never the service's end. The rest of the job's PyAV work (compose,
encode, close) and the answers to the worker's reads of the spool run on one
dedicated worker thread, the model on the engine's worker; the event loop only
moves bytes. Closing the generator (client gone) aborts the spool, which
wakes a blocked read, and the job's thread closes its containers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import av
import numpy as np
from PIL import Image

from services.common.decoding import DEFAULT_DECODE_MEMORY_BYTES
from services.common.errors import InvalidRequest
from services.common.registry import ModelLimits
from services.common.runner import Progress
from services.common.video_decoding import IsolatedVideo, PositionalReader, UploadAborted, VideoProbe
from services.segmentation.engines import Sam3Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes of an upload kept in memory before the spool moves to a temporary file.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
#: Largest accepted video upload.
DEFAULT_MAX_VIDEO_BYTES = 1024 * 1024 * 1024
#: Longest WebM cluster in milliseconds: how soon encoded bytes leave the muxer.
CLUSTER_MS = 500
#: libvpx-vp9 settings: alpha needs auto-alt-ref off; no lag so frames leave at once.
VP9_OPTIONS = {
    "auto-alt-ref": "0",
    "lag-in-frames": "0",
    "deadline": "realtime",
    "cpu-used": "8",
    "row-mt": "1",
    "crf": "32",
    "b": "0",
}
#: Largest output chunk message.
MAX_CHUNK_BYTES = 1024 * 1024


class UploadSpool:
    """An upload received in chunks, readable (and seekable) while it arrives.

    Thread-safe: the servicer writes (on a worker thread: the spool may be on
    disk), the job's PyAV thread reads through :meth:`reader`.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_VIDEO_BYTES, memory_bytes: int = SPOOL_MEMORY_BYTES):
        self.max_bytes = max_bytes
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_bytes)
        self._cond = threading.Condition()
        self._size = 0
        self._complete = False
        self._aborted = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._complete

    def write(self, data: bytes) -> None:
        """Appends a chunk (blocking: may write to disk)."""
        with self._cond:
            if self._aborted:
                raise UploadAborted
            if self._complete:
                raise InvalidRequest("A file chunk arrived after 'upload_complete'")
            if self._size + len(data) > self.max_bytes:
                raise InvalidRequest(f"The video is larger than the maximum of {self.max_bytes} bytes")
            self._file.seek(0, os.SEEK_END)
            self._file.write(data)
            self._size += len(data)
            self._cond.notify_all()

    def finish(self) -> None:
        """The upload is complete: readers see the end of the file."""
        with self._cond:
            self._complete = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Wakes and fails every blocked and future read."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def close(self) -> None:
        self.abort()
        with self._cond:
            self._file.close()

    def reader(self) -> SpoolReader:
        return SpoolReader(self)

    # --- for SpoolReader ---

    def _read_at(self, position: int, size: int) -> bytes:
        with self._cond:
            while not self._aborted and position >= self._size and not self._complete:
                self._cond.wait()
            if self._aborted:
                raise UploadAborted
            if position >= self._size:
                return b""
            self._file.seek(position)
            return self._file.read(max(0, min(size, self._size - position)))

    def _final_size(self) -> int | None:
        with self._cond:
            return self._size if self._complete else None


class SpoolReader(PositionalReader):
    """A read-only, seekable file object over an :class:`UploadSpool`: a read blocks until
    some bytes exist past the position or the upload ended."""

    def __init__(self, spool: UploadSpool) -> None:
        super().__init__()
        self._spool = spool

    def _read_at(self, position: int, size: int) -> bytes:
        if size is None or size < 0:
            size = 1 << 20
        return self._spool._read_at(position, size)

    def _size(self) -> int | None:
        return self._spool._final_size()


@dataclass(frozen=True)
class VideoSummary:
    frames_processed: int
    frames_with_object: int
    model: str
    queue_ms: float
    inference_ms: float
    encode_ms: float


VideoEvent = VideoProbe | bytes | Progress | VideoSummary


class _Sink:
    """A write-only byte sink: PyAV sees no ``seek``, so the muxer streams."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class AlphaWebmEncoder:
    """RGBA frames -> WebM, VP9 with alpha, bytes handed out as they are produced (blocking calls)."""

    def __init__(self, width: int, height: int, frame_rate: Fraction) -> None:
        self._sink = _Sink()
        self._container: Any = av.open(
            self._sink, "w", format="webm", options={"cluster_time_limit": str(CLUSTER_MS)}
        )
        self._stream: Any = self._container.add_stream("libvpx-vp9", rate=frame_rate, options=VP9_OPTIONS)
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuva420p"
        self._frames = 0
        self._closed = False

    def add(self, rgba: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(rgba, format="rgba")
        frame.pts = self._frames
        self._frames += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> None:
        """Flushes the encoder and closes the container (the last bytes are then in :meth:`take`)."""
        if self._closed:
            return
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._closed = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:  # abandoning a half-written output
                log.debug("closing an unfinished WebM encoder failed", exc_info=True)

    def take(self) -> bytes:
        return self._sink.take()


def compose_rgba(image: Image.Image, mask: np.ndarray | None) -> np.ndarray:
    """The frame's pixels with alpha 255 inside the mask and 0 elsewhere (all 0 without a mask)."""
    rgba = np.empty((image.height, image.width, 4), dtype=np.uint8)
    rgba[..., :3] = np.asarray(image.convert("RGB"))
    rgba[..., 3] = 0 if mask is None else np.where(mask, 255, 0)
    return rgba


async def remove_video_background(
    spool: UploadSpool,
    *,
    engine: Sam3Engine,
    prompt: str,
    limits: ModelLimits,
    request_id: str = "",
    batch_frames: int | None = None,
    decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES,
) -> AsyncGenerator[VideoEvent, None]:
    """Probe first; after the consumer asks again: WebM bytes and progress per batch; a summary last.

    The consumer controls the pace: nothing is decoded or segmented until it
    asks for the event after the probe. Closing the generator aborts the job.
    """
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video")
    state: dict[str, Any] = {}

    async def on_thread(fn: Callable[[], T]) -> T:
        return await loop.run_in_executor(executor, fn)

    def cleanup() -> None:
        encoder = state.get("encoder")
        if encoder is not None:
            encoder.close()
        decoder = state.get("decoder")
        if decoder is not None:
            decoder.close()

    batch = batch_frames or engine.frame_batch
    try:
        # Demuxing and decoding run in a worker process of their own (a crash there is this
        # job's 400, never the service's end); it reads the spool through this job's thread.
        decoder = await on_thread(
            lambda: IsolatedVideo(spool.reader(), limits, memory_bytes=decode_memory_bytes)
        )
        state["decoder"] = decoder
        probe = await on_thread(decoder.probe)
        yield probe

        def next_batch() -> list[Image.Image]:
            return decoder.frames(batch)

        encoder = await on_thread(lambda: AlphaWebmEncoder(probe.width, probe.height, probe.frame_rate))
        state["encoder"] = encoder
        processed = with_object = 0
        queue_ms = inference_ms = encode_ms = 0.0
        while processed < probe.frames:
            images = await on_thread(next_batch)
            if not images:
                break
            found = await engine.detect_frames(images, prompt, request_id=request_id)
            queue_ms += found.queue_ms
            inference_ms += found.inference_ms

            def encode_batch(images: list[Image.Image] = images, detections: Any = found.detections) -> bytes:
                for image, detection in zip(images, detections, strict=True):
                    encoder.add(compose_rgba(image, detection.mask))
                return encoder.take()

            started = time.perf_counter()
            data = await on_thread(encode_batch)
            encode_ms += (time.perf_counter() - started) * 1000
            processed += len(images)
            with_object += sum(1 for d in found.detections if d.found)
            for offset in range(0, len(data), MAX_CHUNK_BYTES):
                yield data[offset : offset + MAX_CHUNK_BYTES]
            yield Progress(step=processed, total_steps=probe.frames)
        if processed == 0:
            raise InvalidRequest("The video has no decodable frames")
        started = time.perf_counter()

        def finish() -> bytes:
            encoder.finish()
            return encoder.take()

        tail = await on_thread(finish)
        encode_ms += (time.perf_counter() - started) * 1000
        for offset in range(0, len(tail), MAX_CHUNK_BYTES):
            yield tail[offset : offset + MAX_CHUNK_BYTES]
        yield VideoSummary(processed, with_object, engine.spec.id, queue_ms, inference_ms, encode_ms)
    finally:
        spool.abort()  # wakes a read still blocked on the job's thread
        executor.submit(cleanup)
        executor.shutdown(wait=False)
