"""Images made in the tests, and checks shared by the upscale tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((x - y) ** 2)))


def picture(size: int = 192, *, seed: int = 0) -> Image.Image:
    """A smooth, textured synthetic picture: sinusoidal colour fields with a finer texture,
    outlined discs, a dark bar and a bright diagonal line (``seed`` shifts the pattern)."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = seed * 0.37
    r = 0.5 + 0.3 * np.sin(2 * np.pi * (1.5 * x + 0.5 * y) + phase) + 0.15 * np.sin(2 * np.pi * 6 * x * y)
    g = 0.5 + 0.35 * np.cos(2 * np.pi * (0.7 * x - 1.2 * y) + phase)
    b = 0.3 + 0.6 * x * y
    image = Image.fromarray((np.clip(np.stack([r, g, b], -1), 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    k = size / 128
    for i in range(6):
        box = [k * (10 + i * 18), k * (20 + (i % 3) * 30), k * (30 + i * 18), k * (45 + (i % 3) * 30)]
        draw.ellipse(box, fill=(250 - i * 30, 40 + i * 30, 90), outline=(0, 0, 0), width=max(1, int(2 * k)))
    draw.rectangle([20 * k, 95 * k, 110 * k, 115 * k], fill=(30, 30, 40))
    draw.line([0, 127 * k, 127 * k, 60 * k], fill=(255, 255, 255), width=max(1, int(3 * k)))
    return image


def noise(width: int, height: int, *, seed: int) -> Image.Image:
    """Smoothed random colours: every seed gives a clearly different picture."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 4), max(2, width // 4), 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
