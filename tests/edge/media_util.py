"""Real media made in the test: images with a clear object, short videos made with PyAV."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image, ImageDraw


def object_png(width: int = 160, height: int = 120) -> bytes:
    """A red disc on a white background."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(220, 30, 30)
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def moving_square_video(
    frames: int = 12, rate: int = 12, width: int = 128, height: int = 96, container: str = "mp4"
) -> bytes:
    """A blue square crossing a grey field: H.264 in MP4 (or VP9 in WebM)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("libx264" if container == "mp4" else "libvpx-vp9", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.full((height, width, 3), 128, dtype=np.uint8)
            x = 4 + index * (width - 40) // max(frames - 1, 1)
            pixels[30:62, x : x + 32] = (20, 40, 230)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def audio_only_file(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """An MP4 (M4A) with one AAC audio stream and no video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = int(seconds * rate)
        tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / rate)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_vp9_alpha(data: bytes) -> tuple[list[np.ndarray], float]:
    """RGBA frames of a WebM, decoded with libvpx-vp9 (the default VP9 decoder drops alpha)."""
    frames: list[np.ndarray] = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        codec = av.CodecContext.create("libvpx-vp9", "r")
        for packet in container.demux(stream):
            for frame in codec.decode(packet):
                frames.append(frame.to_ndarray(format="rgba"))
    return frames, rate
