"""What decoding in a worker process costs: isolated vs. in-process decode of the same file.

Not a test. Run with `.venv/bin/python bench/decode_isolation.py`.
Servicers decode untrusted uploads through :class:`services.common.decoding.DecodePool`
(a crash kills a worker, not the service); before, they decoded on a worker
thread of their own process (``asyncio.to_thread``). This measures both, one
decode at a time with a warm worker, for:

  1. a 1024x1024 RGB PNG (``decode_image``: the pixels come back pickled, 3 MiB);
  2. a 10 s 48 kHz stereo 16-bit WAV (``decode_audio``: 3.7 MB of float32 back).

It prints the median and p90 of each, the difference (the price of isolation:
pickling the arguments and the result through a pipe) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from services.common.decoding import DecodePool  # noqa: E402
from services.common.media.audio import decode_audio, encode_audio  # noqa: E402
from services.common.media.image import decode_image  # noqa: E402


def png_1024() -> bytes:
    """A 1024x1024 photo-like PNG: gradients plus a little noise."""
    y, x = np.mgrid[0:1024, 0:1024]
    noise = np.random.default_rng(0).integers(0, 12, (1024, 1024), dtype=np.int64)
    pixels = np.stack([(x // 4 + noise) % 256, (y // 4 + noise) % 256, ((x + y) // 8) % 256], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_10s() -> bytes:
    t = np.arange(48000 * 10) / 48000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1) * 0.3
    return encode_audio((stereo * 32767).astype("<i2").tobytes(), 48000, "wav", channels=2)[0]


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


async def compare(
    label: str, pool: DecodePool, fn: Callable[..., Any], data: bytes, n: int, **kw: Any
) -> None:
    async def local() -> Any:
        return await asyncio.to_thread(fn, data, **kw)

    async def isolated() -> Any:
        return await pool.run("the file", fn, data, **kw)

    for _ in range(3):  # warm: the worker is started and has imported the decoders
        await local()
        await isolated()
    a: list[float] = []
    b: list[float] = []
    for _ in range(n):  # alternated, so drift hits both alike
        a += await timed(local, 1)
        b += await timed(isolated, 1)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{label} ({len(data) / 1e6:.2f} MB file)")
    print(f"  in-process (worker thread): median {ma:7.2f} ms   p90 {p90(a):7.2f} ms")
    print(f"  isolated (decode worker):   median {mb:7.2f} ms   p90 {p90(b):7.2f} ms")
    print(f"  isolation costs {mb - ma:+.2f} ms per decode: ratio {mb / ma:.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=30, help="decodes of each kind and path")
    args = parser.parse_args()
    pool = DecodePool(1)
    try:
        await compare(
            "1024x1024 PNG, decode_image", pool, decode_image, png_1024(), args.n, max_pixels=1 << 24
        )
        await compare(
            "10 s 48 kHz stereo WAV, decode_audio",
            pool,
            decode_audio,
            wav_10s(),
            args.n,
            max_seconds=60,
            max_bytes=1 << 26,
        )
    finally:
        pool.close()


if __name__ == "__main__":
    asyncio.run(main())
