"""Edit throughput for 1 vs. 4 input images, and encode time per output format.

Not a test. Run with `.venv/bin/python bench/image_edit.py` (or `make bench`).

1. A child process runs the mesh (`bench/mesh.py`, one process); this process
   sends the same edit (256x256 inputs and output, FLUX.2-klein distilled,
   4 steps, fixed seed) through POST /v1/images/edits with one input image and
   with four, from `--concurrency` clients for `--seconds` each, and prints
   edits per second, p50/p99 latency, and the 4-input/1-input ratios.
2. In this process, `services.common.media.encode_image` (what image_gen uses)
   encodes 1024x1024 images as PNG, JPEG and WebP: a smooth synthetic picture
   and a noise-like one (what the tiny random models draw, PNG's worst case).
   It prints the median time and size per format and the ratio to PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh, wait_ready  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _png(color: tuple[int, int, int], size: int = 256) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def _edits(info: dict[str, Any], concurrency: int, seconds: float) -> None:
    import aiohttp

    edge = f"http://127.0.0.1:{info['edge']}"
    headers = {"X-API-Key": str(info["key"]), "Accept-Encoding": "identity"}
    inputs = [_png((40 * i, 90, 200 - 40 * i)) for i in range(4)]
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, edge)

        async def one_edit(count: int, *, may_be_loading: bool = False) -> float:
            body = {
                "prompt": "make it look like autumn",
                "input_images": inputs[:count],
                "seed": 5,
                "response_format": "url",
            }
            start = time.perf_counter()
            async with http.post(edge + "/v1/images/edits", json=body, headers=headers) as response:
                if may_be_loading and response.status == 503:  # models after the default load later
                    await asyncio.sleep(0.5)
                    return await one_edit(count, may_be_loading=True)
                assert response.status == 200, await response.text()
                await response.read()
            return (time.perf_counter() - start) * 1000

        results: dict[int, tuple[float, list[float]]] = {}
        for count in (1, 4):
            for _ in range(3):  # warm-up
                await one_edit(count, may_be_loading=True)
            latencies: list[float] = []
            deadline = time.perf_counter() + seconds

            async def worker(
                count: int = count, latencies: list[float] = latencies, deadline: float = deadline
            ) -> None:
                while time.perf_counter() < deadline:
                    latencies.append(await one_edit(count))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            rate = len(latencies) / (time.perf_counter() - start)
            results[count] = (rate, latencies)
            print(
                f"  {count} input image{'s' if count > 1 else ' '}  {rate:7.2f} edits/s   "
                f"p50 {percentile(latencies, 50):8.2f} ms   p99 {percentile(latencies, 99):8.2f} ms"
            )
        (r1, l1), (r4, l4) = results[1], results[4]
        print(
            f"  -> 4 inputs vs 1: throughput ratio {r4 / r1:.3f}, "
            f"p50 latency ratio {percentile(l4, 50) / percentile(l1, 50):.3f}"
        )


def _encodes(repeats: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from services.common.media.image import encode_image

    pixels = np.zeros((1024, 1024, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 1024, dtype=np.uint8)
    pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
    pixels[..., 2] = 128
    smooth = Image.fromarray(pixels)
    draw = ImageDraw.Draw(smooth)
    for i in range(12):
        draw.ellipse((40 + 70 * i, 100 + 50 * i, 240 + 70 * i, 300 + 50 * i), fill=(255 - 20 * i, 30, 20 * i))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    for label, image in (("smooth", smooth), ("noise-like", noise)):
        timings: dict[str, tuple[float, int]] = {}
        for fmt in ("png", "jpeg", "webp"):
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                data = encode_image(image, fmt)
                samples.append((time.perf_counter() - start) * 1000)
            timings[fmt] = (statistics.median(samples), len(data))
        png_ms, png_size = timings["png"]
        for fmt, (ms, size) in timings.items():
            print(
                f"  {label:<10} {fmt:<5} {ms:8.2f} ms  {size / 1024:8.1f} KiB   "
                f"time vs png {ms / png_ms:5.2f}   size vs png {size / png_size:5.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=9, help="encodes per format and picture")
    args = parser.parse_args()
    print(f"1) edit throughput through the edge, {args.concurrency} clients, {args.seconds:.0f} s per case")
    with running_mesh("single") as info:
        asyncio.run(_edits(info, args.concurrency, args.seconds))
    print("2) encode time per format at 1024x1024 (median)")
    _encodes(args.repeats)


if __name__ == "__main__":
    main()
