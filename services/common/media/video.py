"""Video: RGB frames to an MP4 browsers play.

:class:`Mp4Encoder` (and :func:`encode_video_mp4` around it) writes RGB frames
as an MP4: H.264 (libx264) High profile, yuv420p, ``moov`` first
(``+faststart``), fed one frame at a time so no caller ever holds a whole video
of frames; fixed encoder settings and no timestamps, so the same frames always
give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# --- video: RGB frames to MP4 (H.264, yuv420p), one frame at a time ---

#: MIME type of the files :class:`Mp4Encoder` writes.
MP4_MIME_TYPE = "video/mp4"
#: libx264 settings, fixed so the same frames always give the same bytes: the
#: ``fast`` preset, constant quality 20, High profile (every browser decodes
#: it), a fixed thread count (x264's output depends on it, not on the host's
#: cores) and no macroblock-tree rate control (with it, repeated encodes of the
#: same frames measured different bytes now and then).
H264_OPTIONS: dict[str, str] = {
    "preset": "fast",
    "crf": "20",
    "profile": "high",
    "threads": "4",
    "x264-params": "mbtree=0",
}
#: MP4 muxer settings: ``moov`` before the media data (playable while it
#: downloads), and no library version strings or creation times in the file.
MP4_MUXER_OPTIONS: dict[str, str] = {"movflags": "+faststart", "fflags": "+bitexact"}


class Mp4Encoder:
    """RGB frames -> an MP4 file in memory, H.264 yuv420p at a constant frame rate.

    Blocking calls: :meth:`add` one ``(height, width, 3)`` uint8 frame at a
    time (it is converted to yuv420p and encoded at once; only the encoder's
    own look-ahead holds frames), then :meth:`finish` for the file's bytes.
    Width and height must be even (4:2:0 chroma). Use it as a context manager
    (or call :meth:`close`) so an abandoned encoder frees its buffers.
    """

    def __init__(self, width: int, height: int, fps: float) -> None:
        import os
        import tempfile
        from fractions import Fraction

        import av

        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs a positive, even width and height, not {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, not {fps}")
        self.width = width
        self.height = height
        self.fps = fps
        self.frames = 0
        # A real file: ``+faststart`` re-opens the output by name to move ``moov``
        # to the front, and the encoded video waits on disk, not in memory.
        self._dir = tempfile.TemporaryDirectory(prefix="kiln-mp4-")
        self._path = os.path.join(self._dir.name, "video.mp4")
        self._container: Any = av.open(self._path, mode="w", format="mp4", options=dict(MP4_MUXER_OPTIONS))
        rate = Fraction(fps).limit_denominator(1001)
        self._stream: Any = self._container.add_stream("libx264", rate=rate, options=dict(H264_OPTIONS))
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = 1 / rate
        self._closed = False

    def add(self, rgb: Any) -> None:
        """Encodes the next frame: a ``(height, width, 3)`` uint8 RGB array."""
        import av

        if self._closed:
            raise RuntimeError("the MP4 encoder is closed")
        if rgb.shape != (self.height, self.width, 3) or str(rgb.dtype) != "uint8":
            raise ValueError(
                f"expected a ({self.height}, {self.width}, 3) uint8 frame, not {rgb.shape} {rgb.dtype}"
            )
        # The stream converts it to yuv420p. (Handing the encoder a frame from our own
        # ``reformat`` call measured non-deterministic: the same frames, different bytes.)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> bytes:
        """Flushes the encoder, writes the index and returns the whole file."""
        if self._closed:
            raise RuntimeError("the MP4 encoder is closed")
        if not self.frames:
            raise ValueError("an MP4 needs at least one frame")
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._closed = True
        try:
            with open(self._path, "rb") as fh:
                return fh.read()
        finally:
            self._dir.cleanup()

    def close(self) -> None:
        """Abandons an unfinished file (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:  # an unfinished file: nothing worth keeping
                pass
        self._dir.cleanup()

    def __enter__(self) -> Mp4Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_video_mp4(frames: Iterable[Any], *, width: int, height: int, fps: float) -> bytes:
    """Encodes RGB frames (``(height, width, 3)`` uint8 arrays) as an MP4; see :class:`Mp4Encoder`.

    ``frames`` is consumed one at a time: pass a generator to keep memory flat
    in the video's length.
    """
    with Mp4Encoder(width, height, fps) as encoder:
        for frame in frames:
            encoder.add(frame)
        return encoder.finish()
