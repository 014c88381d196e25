"""Image-to-video: frames generated per second over gRPC, and peak memory while encoding 1080p.

Not a test. Run with `.venv/bin/python bench/video.py`. Everything is
measured in this one run and printed with its ratios:

1. **Throughput.** A real video gRPC service on 127.0.0.1:0 with the tiny
   random-weight Wan 2.2 image-to-video model (the registry's default)
   generates ``--frames`` frames (81) at 480p (832x480), ``--steps`` steps (4),
   ODE sampler, ``--repeats`` times; printed: wall time per video, frames
   generated per second, seconds per video-second, and the service's own
   timing split (inference = denoising + VAE decoding, encode = H.264).
2. **Peak RSS while encoding 81 frames at 1080p.** In a fresh child process
   (so its ``ru_maxrss`` high-water mark is the encoder's own), the tiny
   model's VAE decodes latents of an 81-frame 1920x1088 video (the
   pipeline's starting noise: decoding costs the same whatever the values)
   latent frame by latent frame straight into the H.264 encoder, exactly as
   the engine does. Printed: RSS before, peak RSS, the growth, and the size
   of the raw frames (81 x 1920 x 1088 x 3 bytes) and of the float32 video
   ``AutoencoderKLWan.decode`` would hold at once, with the ratios. With
   ``--compare-whole`` a second child decodes the whole video at once first
   (diffusers' default path) and encodes it after, for the measured
   difference.

The model cache is ``--cache-dir`` (default: a temporary directory; the tiny
model is built once, before anything is timed).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1024 * 1024


def input_png(width: int = 832, height: int = 480) -> bytes:
    """A smooth synthetic first frame."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = (rng.random((8, 14, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


async def bench_throughput(cache_dir: Path, *, frames: int, steps: int, repeats: int, threads: int) -> None:
    from kiln.video.v1 import video_service_pb2 as pb
    from kiln.video.v1 import video_service_pb2_grpc as pb_grpc
    from services.common.grpc_client import mesh_channel
    from services.common.registry import load_registry
    from services.common.settings import Settings
    from services.video.engines import build_engine_pool
    from services.video.server import create_service

    data_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-video-"))
    settings = Settings(data_dir=data_dir, model_cache_dir=cache_dir, torch_threads=threads)
    registry = load_registry(settings.registry_path)
    pool = build_engine_pool(registry, cache_dir=cache_dir, torch_threads=threads)
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    await pool.wait_loaded()
    image = input_png()
    print(f"\n== Throughput: {frames} frames at 480p, {steps} steps, ODE, gRPC end to end ==")
    print(
        f"{'run':>4} {'wall s':>8} {'frames/s':>9} {'s per video s':>14} {'inference s':>12} {'encode s':>9}"
    )
    walls: list[float] = []
    try:
        async with mesh_channel(f"127.0.0.1:{service.port}", settings, "bench") as channel:
            stub = pb_grpc.VideoServiceStub(channel)
            for run in range(repeats):
                request = pb.GenerateVideoRequest(
                    prompt="the camera slowly pushes in",
                    image=image,
                    num_frames=frames,
                    num_steps=steps,
                    resolution="480p",
                    use_ode=True,
                    seed=run,
                )
                started = time.perf_counter()
                size = 0
                summary: Any = None
                async for message in stub.GenerateVideo(request, wait_for_ready=True, timeout=3600):
                    kind = message.WhichOneof("event")
                    if kind == "mp4_chunk":
                        size += len(message.mp4_chunk)
                    elif kind == "summary":
                        summary = message.summary
                wall = time.perf_counter() - started
                walls.append(wall)
                assert summary is not None and summary.num_frames == frames and size == summary.size_bytes
                print(
                    f"{run + 1:>4} {wall:8.2f} {frames / wall:9.2f} {wall / summary.duration_seconds:14.2f} "
                    f"{summary.timing.inference_ms / 1000:12.2f} {summary.timing.encode_ms / 1000:9.2f}"
                    f"   ({summary.width}x{summary.height}, {size / MB:.1f} MB MP4)"
                )
    finally:
        await service.stop(1)
    best = min(walls)
    print(f"best: {frames / best:.2f} frames generated per second ({best:.2f} s per {frames}-frame video)")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def encode_1080p_child(cache_dir: str, frames: int, threads: int, whole: bool) -> dict[str, float]:
    """Runs in a fresh process: decode + encode ``frames`` frames at 1920x1088, measuring RSS."""
    import torch

    from services.common.media.video import encode_video_mp4
    from services.common.registry import DEFAULT_VIDEO_MODEL, load_registry
    from services.common.settings import DEFAULT_REGISTRY
    from services.video.engines import (
        WanI2VEngine,
        build_engine_pool,
        encode_latents_mp4,
        to_rgb_frames,
    )

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    pool = build_engine_pool(
        load_registry(DEFAULT_REGISTRY), cache_dir=Path(cache_dir), torch_threads=threads
    )
    engine = pool.engines[DEFAULT_VIDEO_MODEL]
    assert isinstance(engine, WanI2VEngine)
    engine.load_blocking()
    vae = engine.pipes[True].vae
    width, height = 1920, 1088
    latent_frames = (frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator)
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    started = time.perf_counter()
    with torch.inference_mode():
        if whole:  # diffusers' default: the whole video decoded at once, then encoded
            config = vae.config
            mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
            video = vae.decode(latents * std + mean, return_dict=False)[0]
            mp4 = encode_video_mp4(to_rgb_frames(video), width=width, height=height, fps=16)
            count = int(video.shape[2])
        else:
            encoded = encode_latents_mp4(vae, latents, width=width, height=height, fps=16)
            mp4, count = encoded.mp4, encoded.frames
    seconds = time.perf_counter() - started
    return {
        "frames": count,
        "seconds": seconds,
        "rss_before": before,
        "peak_before": peak_before,
        "peak": _peak_rss_bytes(),
        "mp4_bytes": len(mp4),
    }


def bench_encode_rss(cache_dir: Path, *, frames: int, threads: int, compare_whole: bool) -> None:
    raw = frames * 1920 * 1088 * 3
    floats = frames * 3 * 1920 * 1088 * 4
    print(f"\n== Peak RSS while decoding and encoding {frames} frames at 1920x1088 (fresh child process) ==")
    print(f"raw frames held at once would be:          {raw / MB:9.1f} MB (uint8 RGB)")
    print(f"the float32 video VAE.decode would hold:   {floats / MB:9.1f} MB")
    context = multiprocessing.get_context("spawn")
    modes = [False, True] if compare_whole else [False]
    for whole in modes:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(encode_1080p_child, str(cache_dir), frames, threads, whole).result()
        grown = result["peak"] - result["rss_before"]
        label = "whole video decoded, then encoded" if whole else "streaming (as served)"
        print(
            f"-- {label}: {int(result['frames'])} frames in {result['seconds']:.1f} s "
            f"({result['frames'] / result['seconds']:.2f} frames/s), MP4 {result['mp4_bytes'] / MB:.1f} MB"
        )
        print(
            f"   RSS before {result['rss_before'] / MB:8.1f} MB (peak so far {result['peak_before'] / MB:.1f} MB)"
        )
        print(f"   peak RSS   {result['peak'] / MB:8.1f} MB; growth while encoding {grown / MB:8.1f} MB")
        print(f"   growth / raw frames: {grown / raw:6.3f}   growth / float32 video: {grown / floats:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-whole", action="store_true", help="also measure decode-all-then-encode")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="kiln-bench-models-"))

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
    from services.common.registry import DEFAULT_VIDEO_MODEL
    from services.video.tiny import TINY_VERSION, build_tiny_wan_i2v

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with MODEL_LOAD_LOCK:  # built once, before anything is timed
        ensure_tiny_model_directory(cache_dir, DEFAULT_VIDEO_MODEL, build_tiny_wan_i2v, version=TINY_VERSION)
    if not args.skip_throughput:
        asyncio.run(
            bench_throughput(
                cache_dir, frames=args.frames, steps=args.steps, repeats=args.repeats, threads=args.threads
            )
        )
    bench_encode_rss(cache_dir, frames=args.frames, threads=args.threads, compare_whole=args.compare_whole)


if __name__ == "__main__":
    main()
