"""Real media made in the tests: an image with a clear object, short videos, broken files."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.codec.context import CodecContext
from PIL import Image, ImageDraw


def object_image(width: int = 203, height: int = 151) -> Image.Image:
    """A yellow ball on a blue background (odd sizes, so resizing back is really checked)."""
    image = Image.new("RGB", (width, height), (20, 60, 200))
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(250, 200, 0)
    )
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def video_frames(count: int, width: int, height: int, *, noise: bool = False) -> list[np.ndarray]:
    """A ball moving left to right (on noise when ``noise``: bigger files, for streaming tests)."""
    rng = np.random.default_rng(1)
    frames = []
    for index in range(count):
        if noise:
            array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        else:
            array = np.zeros((height, width, 3), dtype=np.uint8)
            array[...] = (20, 60, 200)
        image = Image.fromarray(array)
        x = (width - height // 2) * index // max(1, count - 1)
        ImageDraw.Draw(image).ellipse((x, height // 4, x + height // 2, 3 * height // 4), fill=(250, 200, 0))
        frames.append(np.asarray(image))
    return frames


def make_video(
    path: Path,
    *,
    frames: int = 12,
    width: int = 64,
    height: int = 48,
    rate: int = 10,
    container: str = "mp4",
    noise: bool = False,
    faststart: bool = False,
    audio: bool = False,
) -> bytes:
    """Encodes a short video with PyAV (H.264 in MP4, VP9 in WebM) and returns the file's bytes."""
    codec = "libvpx-vp9" if container == "webm" else "libx264"
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=options) as output:
        stream: Any = output.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if audio:
            sound = output.add_stream("aac", rate=8000)
        for index, array in enumerate(video_frames(frames, width, height, noise=noise)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                output.mux(packet)
            if audio and index == 0:
                _mux_tone(output, sound, seconds=frames / rate)
        for packet in stream.encode(None):
            output.mux(packet)
    return path.read_bytes()


def _mux_tone(output: Any, stream: Any, *, seconds: float) -> None:
    samples = int(8000 * seconds)
    tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 8000)).astype(np.float32)[None, :]
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.sample_rate = 8000
    frame.pts = 0
    for packet in stream.encode(frame):
        output.mux(packet)
    for packet in stream.encode(None):
        output.mux(packet)


def make_audio_only(path: Path) -> bytes:
    """An M4A (MP4 container) with one AAC stream and no video."""
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("aac", rate=8000)
        _mux_tone(output, stream, seconds=0.5)
    return path.read_bytes()


def decode_rgb_frames(data: bytes) -> list[Image.Image]:
    """The frames of a video as the service sees them (PyAV's default decoder, RGB)."""
    container: Any = av.open(io.BytesIO(data))
    with container:
        return [frame.to_image() for frame in container.decode(container.streams.video[0])]


def decode_alpha_webm(data: bytes) -> tuple[list[np.ndarray], Fraction, str]:
    """RGBA frames of a VP9-with-alpha WebM, decoded with libvpx-vp9 (the only decoder that keeps alpha)."""
    container: Any = av.open(io.BytesIO(data))
    with container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate)
        decoder = CodecContext.create("libvpx-vp9", "r")
        frames = [
            frame.to_ndarray(format="rgba")
            for packet in container.demux(stream)
            for frame in decoder.decode(packet)
        ]
        return frames, rate, container.format.name
