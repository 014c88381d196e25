"""Music: seconds of audio generated per second of wall time, at 10 s and 60 s songs.

Not a test. Run with `.venv/bin/python bench/music.py`. A real music gRPC
service (the shipped registry's default model: the tiny random-weight
ACE-Step 1.5 unless the registry points at real weights) runs in this process
on 127.0.0.1:0; this process asks GenerateMusic for ``--durations`` seconds of
music with the model's default steps (8, the turbo model's), ``--runs`` times
each after one warm-up, reading the whole stream (progress, result, PCM), and
prints medians: wall time, time in the model, audio seconds per wall second
(above 1 is faster than real time) and the ratio of that speed between the
longest and the shortest duration (1.0: the cost grows linearly with the
song's length). A cover and a repaint of a 10 s song are timed the same way.

The model cache is ``--cache-dir`` (default: a temporary directory, so the
first build of the tiny model is part of the set-up, not the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def _read(stream: AsyncIterable[Any]) -> tuple[float, float, float]:
    """(wall seconds, model seconds, audio seconds) of one generating call."""
    started = time.perf_counter()
    audio = inference = 0.0
    received = 0
    async for message in stream:
        kind = message.WhichOneof("event")
        if kind == "result":
            audio = message.result.duration_seconds
            inference = message.result.timing.inference_ms / 1000
            expected = message.result.pcm_bytes
        elif kind == "pcm":
            received += len(message.pcm)
    wall = time.perf_counter() - started
    assert audio > 0 and received == expected, "the stream ended without the whole song"
    return wall, inference, audio


def _source_song(seconds: float, rate: int) -> bytes:
    """A stereo 16-bit WAV: a chord pulsing on a beat."""
    import numpy as np

    from services.common.media.audio import encode_audio

    t = np.arange(round(seconds * rate)) / rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    left = 0.5 * chord * (0.5 + 0.5 * np.cos(2 * np.pi * 2.0 * t))
    samples = (np.stack([left, np.roll(left, 37)], axis=1) * 32767).astype("<i2")
    return encode_audio(samples.tobytes(), rate, "wav", channels=2)[0]


async def bench(cache_dir: Path, *, durations: list[float], runs: int, threads: int) -> None:
    from kiln.music.v1 import music_service_pb2 as pb
    from kiln.music.v1 import music_service_pb2_grpc as pb_grpc
    from services.common.grpc_client import mesh_channel
    from services.common.registry import DEFAULT_MUSIC_MODEL, load_registry
    from services.common.settings import Settings
    from services.music.engines import MusicEngine, build_music_pool
    from services.music.server import create_service

    data_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-music-"))
    settings = Settings(data_dir=data_dir, model_cache_dir=cache_dir, torch_threads=threads)
    registry = load_registry(settings.registry_path)
    pool = build_music_pool(registry, cache_dir=cache_dir, torch_threads=threads, default=DEFAULT_MUSIC_MODEL)
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    await pool.wait_loaded()
    engine = pool.get(DEFAULT_MUSIC_MODEL)
    assert isinstance(engine, MusicEngine)
    spec = registry.resolve(None, "music", DEFAULT_MUSIC_MODEL)
    speeds: dict[float, float] = {}
    try:
        async with mesh_channel(f"127.0.0.1:{service.port}", settings, "bench") as channel:
            stub = pb_grpc.MusicServiceStub(channel)
            print(
                f"{spec.id} ({spec.weights} weights, {engine.sample_rate} Hz, {engine.channels} ch), "
                f"{spec.defaults.steps} steps, {threads} torch threads, median of {runs}:"
            )
            print(f"{'task':10} {'audio s':>8} {'wall s':>8} {'model s':>8} {'audio s / wall s':>17}")

            async def measure(task: str, seconds: float, call: Any) -> float:
                await _read(call())  # warm-up
                figures = [await _read(call()) for _ in range(runs)]
                wall = statistics.median(f[0] for f in figures)
                model = statistics.median(f[1] for f in figures)
                audio = statistics.median(f[2] for f in figures)
                speed = audio / wall
                print(f"{task:10} {audio:8.1f} {wall:8.2f} {model:8.2f} {speed:17.2f}", flush=True)
                return speed

            for seconds in durations:
                request = pb.GenerateMusicRequest(
                    prompt="energetic electronic dance music", duration_seconds=seconds
                )
                speeds[seconds] = await measure(
                    "generate", seconds, lambda request=request: stub.GenerateMusic(request, timeout=3600)
                )
            source = _source_song(10.0, engine.sample_rate)
            cover = pb.CoverMusicRequest(source_audio=source, prompt="the same song as a string quartet")
            await measure("cover", 10.0, lambda: stub.CoverMusic(cover, timeout=3600))
            repaint = pb.RepaintMusicRequest(
                source_audio=source, prompt="a drum break", start_seconds=4.0, end_seconds=6.0
            )
            await measure("repaint", 10.0, lambda: stub.RepaintMusic(repaint, timeout=3600))
    finally:
        await service.stop(1)
    if len(speeds) >= 2:
        short, long = min(speeds), max(speeds)
        print(
            f"speed at {long:g} s / speed at {short:g} s: {speeds[long] / speeds[short]:.2f}x "
            "(1.00: cost linear in the song's length)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--durations", default="10,60", help="song lengths in seconds, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="kiln-bench-models-"))
    durations = [float(d) for d in args.durations.split(",") if d]
    await bench(cache_dir, durations=durations, runs=args.runs, threads=args.threads)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
