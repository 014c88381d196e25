"""Untrusted media is decoded in worker processes: a native crash kills a worker, never the service.

The functions the workers run in these tests are module-level (the pool pickles
them by name, and its ``spawn`` workers import this module to find them): a real
segmentation fault (``ctypes.string_at(0)``), ``os.abort()``, a CPU spin and a
huge allocation, next to the real decoders of :mod:`services.common.media`.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from services.common.decoding import DecodePool
from services.common.errors import InvalidRequest
from services.common.media.audio import decode_audio, encode_audio
from services.common.media.image import decode_image
from services.common.registry import ModelLimits
from services.common.video_decoding import IsolatedVideo, iter_frames, open_video

CRASHED = "could not be decoded: the decoder failed on it"


def segfault(data: bytes) -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def abort(data: bytes) -> None:
    os.abort()


def spin(data: bytes) -> None:
    while True:
        pass


def allocate(data: bytes, size: int) -> int:
    return int(np.ones(size, dtype=np.uint8).sum())


def interval(seconds: float) -> tuple[int, float, float]:
    """Sleeps; the worker's pid and when it started and ended."""
    started = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), started, time.monotonic()


def loaded_modules() -> list[str]:
    return sorted(sys.modules)


def blas_threads() -> str | None:
    return os.environ.get("OPENBLAS_NUM_THREADS")


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    pool = DecodePool(1)
    yield pool
    pool.close()


async def decode_png(pool: DecodePool) -> Image.Image:
    return await pool.run("The image", decode_image, png(), max_pixels=1 << 20)


@pytest.mark.parametrize("crash", [segfault, abort], ids=["segfault", "abort"])
async def test_a_decoder_that_crashes_natively_kills_only_its_worker(
    pool: DecodePool, crash: Callable[[bytes], None]
) -> None:
    image = await decode_png(pool)
    with pytest.raises(InvalidRequest, match=f"The image {CRASHED}"):
        await pool.run("The image", crash, b"hostile")
    assert pool.crashes == 1
    # this process lives on, and the next decode gets a fresh worker
    again = await decode_png(pool)
    assert again.size == image.size == (64, 48)
    assert np.array_equal(np.asarray(again), np.asarray(image))


async def test_a_crash_fails_only_the_request_that_caused_it() -> None:
    """Two slots: the decode running beside the crash and the ones queued behind it all succeed."""
    pool = DecodePool(2)
    try:
        calls = [pool.run("'ref_audio'", segfault, b"x")] + [decode_png(pool) for _ in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        pool.close()
    assert isinstance(results[0], InvalidRequest) and results[0].message.startswith(f"'ref_audio' {CRASHED}")
    assert all(isinstance(r, Image.Image) and r.size == (64, 48) for r in results[1:]), results
    assert pool.crashes == 1


async def test_concurrent_decodes_are_bounded_by_the_workers() -> None:
    pool = DecodePool(2)
    try:
        runs = await asyncio.gather(*(pool.run("x", interval, 0.3) for _ in range(5)))
    finally:
        pool.close()
    assert len({pid for pid, _, _ in runs}) <= 2
    for _, started, _ in runs:  # at any moment, at most two decodes were running
        assert sum(1 for _, s, e in runs if s <= started < e) <= 2


async def test_errors_of_the_decoder_come_back_as_they_were(pool: DecodePool) -> None:
    with pytest.raises(InvalidRequest, match="not a supported image"):
        await pool.run("The image", decode_image, b"GIF89a not really", max_pixels=1 << 20)
    with pytest.raises(InvalidRequest, match="'ref_audio' is empty"):
        await pool.run("'ref_audio'", decode_audio, b"", max_seconds=5, max_bytes=1 << 20, field="ref_audio")
    assert pool.crashes == 0


async def test_decoded_audio_comes_back_whole(pool: DecodePool) -> None:
    pcm = (np.sin(np.arange(16000) / 5) * 8000).astype("<i2").tobytes()
    wav = encode_audio(pcm, 16000, "wav")[0]
    isolated = await pool.run("'audio'", decode_audio, wav, max_seconds=5, max_bytes=1 << 20)
    local = decode_audio(wav, max_seconds=5, max_bytes=1 << 20)
    assert isolated.sample_rate == local.sample_rate == 16000
    assert np.array_equal(isolated.samples, local.samples)


async def test_a_worker_runs_out_of_memory_as_a_400_and_lives_on() -> None:
    pool = DecodePool(1, memory_bytes=1024 * 1024 * 1024)
    try:
        with pytest.raises(InvalidRequest, match="'audio' needs more memory to decode than is allowed"):
            await pool.run("'audio'", allocate, b"", 2 * 1024 * 1024 * 1024)
        assert await pool.run("'audio'", allocate, b"", 1000) == 1000
    finally:
        pool.close()
    assert pool.crashes == 0


async def test_a_decode_past_its_cpu_budget_stops_its_worker() -> None:
    pool = DecodePool(1, cpu_seconds=1)
    try:
        with pytest.raises(InvalidRequest, match=CRASHED):
            await pool.run("The video", spin, b"")
        assert (await decode_png(pool)).size == (64, 48)
    finally:
        pool.close()
    assert pool.crashes == 1


async def test_workers_never_import_torch(pool: DecodePool) -> None:
    await decode_png(pool)
    wav = encode_audio(b"\0\1" * 8000, 16000, "wav")[0]
    await pool.run("'audio'", decode_audio, wav, max_seconds=5, max_bytes=1 << 20)
    modules = await pool.run("x", loaded_modules)
    assert "av" in modules and "PIL.Image" in modules
    assert "torch" not in modules and "grpc" not in modules
    assert await pool.run("x", blas_threads) == "1"  # numpy's first import in the worker saw it


def test_what_a_spawned_worker_of_kiln_up_imports_holds_no_torch() -> None:
    """Under ``kiln up`` a spawned worker first re-imports the entry point (``kiln_cli.main``,
    as ``__mp_main__``), then the decoders: none of it may pull in torch."""
    code = (
        "import sys, kiln_cli.main, services.common.decoding, services.common.media.audio, services.common.media.image;"
        "print('torch' in sys.modules)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-500:]
    assert child.stdout.strip() == "False"


# --- video: a worker process per job, reading the upload through the service ---

LIMITS = ModelLimits(max_width=1024, max_height=1024, max_frames=100, max_duration_seconds=30)


def crash_after_reading(conn: Any, limits: ModelLimits, memory_bytes: int, cpu_seconds: int) -> None:
    """A video worker whose decoder segfaults once it has read the file's first bytes."""
    conn.send(("read", 0, 4096))
    conn.recv()
    ctypes.string_at(0)


def mp4(frames: int = 6) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(frames):
            pixels = np.full((48, 64, 3), 20 * index, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_a_video_decoder_that_crashes_is_a_400_for_its_job_only() -> None:
    crashed = IsolatedVideo(io.BytesIO(mp4()), LIMITS, worker=crash_after_reading)
    with pytest.raises(InvalidRequest, match=f"The video {CRASHED}"):
        crashed.probe()
    crashed.close()
    # the next job decodes as if nothing happened
    video = IsolatedVideo(io.BytesIO(mp4()), LIMITS)
    try:
        probe = video.probe()
        frames = video.frames(4) + video.frames(4)
        assert video.frames(4) == []
    finally:
        video.close()
    assert (probe.width, probe.height, probe.frames) == (64, 48, 6)
    assert [image.size for image in frames] == [(64, 48)] * 6


def test_an_isolated_video_gives_the_frames_of_an_in_process_decode() -> None:
    data = mp4()
    container, probe = open_video(io.BytesIO(data), LIMITS)
    try:
        local = [np.asarray(image) for image in iter_frames(container, probe)]
    finally:
        container.close()
    video = IsolatedVideo(io.BytesIO(data), LIMITS)
    try:
        assert video.probe() == probe
        isolated = [np.asarray(image) for image in video.frames(100)]
    finally:
        video.close()
    assert len(isolated) == len(local) == 6
    assert all(np.array_equal(a, b) for a, b in zip(isolated, local, strict=True))


def test_a_bad_video_is_the_decoders_400_from_the_worker() -> None:
    video = IsolatedVideo(io.BytesIO(b"\x00\x00\x00\x18ftypXXXX" + mp4()[12:]), LIMITS)
    try:
        with pytest.raises(InvalidRequest, match="not a readable video"):
            video.probe()
    finally:
        video.close()
