"""Encoding and decoding of media files, shared by every capability.

``encode_image`` writes PNG, JPEG or WebP with fixed encoder settings and no
timestamps, so identical pixels (and metadata) always give identical bytes.
Without ``metadata`` a file carries none at all; with it, PNG gets one text
chunk per field plus ``Software=Kiln``, and JPEG / WebP get EXIF:
``ImageDescription`` (the prompt), ``Software`` (Kiln), ``Model`` (the model
field) and ``UserComment`` holding every field as ASCII JSON (the lossless
copy: EXIF ASCII tags cannot hold non-ASCII prompts). :func:`read_image_metadata`
reads either form back into the same dictionary.

``decode_image`` is the one place where untrusted image bytes are opened: it
accepts only real images of the allowed formats and refuses oversized files,
decompression bombs (more than ``max_pixels`` pixels, judged from the header
before any pixel is decoded) and corrupt data with :class:`InvalidRequest`.

``encode_audio`` writes 16-bit PCM, mono (speech) or interleaved stereo
(music), as the audio response formats.

:class:`Mp4Encoder` (and :func:`encode_video_mp4` around it) writes RGB frames
as an MP4 that browsers play: H.264 (libx264) High profile, yuv420p, ``moov``
first (``+faststart``), fed one frame at a time so no caller ever holds a
whole video of frames; fixed encoder settings and no timestamps, so the same
frames always give the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from services.common.errors import InvalidRequest

#: Output formats and their MIME types.
IMAGE_MIME_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Formats :func:`decode_image` accepts by default (Pillow format names).
DECODABLE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: Lossy encoders' quality.
LOSSY_QUALITY = 90
#: The ``Software`` field written with metadata.
SOFTWARE = "Kiln"
#: EXIF tags used for metadata (TIFF / EXIF numbers).
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_MAKE = 0x010F
EXIF_MODEL = 0x0110
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
#: The character-code prefix of an ASCII EXIF UserComment.
_ASCII_COMMENT = b"ASCII\x00\x00\x00"


def normalize_image_format(fmt: str) -> str:
    """``"PNG"`` / ``"jpg"`` / ``"image/webp"`` -> ``"png"`` / ``"jpeg"`` / ``"webp"``."""
    key = fmt.strip().lower().removeprefix("image/")
    key = "jpeg" if key == "jpg" else key
    if key not in IMAGE_MIME_TYPES:
        raise InvalidRequest(f"Unsupported image format '{fmt}'. Supported formats: png, jpeg, webp")
    return key


def image_mime_type(fmt: str = "png") -> str:
    """The MIME type of an output format (``"png"`` -> ``"image/png"``)."""
    return IMAGE_MIME_TYPES[normalize_image_format(fmt)]


def encode_image(image: Image.Image, fmt: str = "png", metadata: Mapping[str, str] | None = None) -> bytes:
    """Encodes an image; the same pixels, format and metadata always give the same bytes.

    ``metadata`` (e.g. prompt, negative_prompt, model, seed, steps) goes into
    PNG text chunks or JPEG / WebP EXIF, with ``Software=Kiln``; ``None``
    writes no metadata at all.
    """
    key = normalize_image_format(fmt)
    buf = io.BytesIO()
    if key == "png":
        if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        extra: dict[str, object] = {}
        if metadata is not None:
            info = PngImagePlugin.PngInfo()
            for name, value in metadata.items():
                info.add_text(name, str(value))  # tEXt, or iTXt when not Latin-1
            info.add_text("Software", SOFTWARE)
            extra["pnginfo"] = info
        image.save(buf, format="PNG", compress_level=6, optimize=False, **extra)
        return buf.getvalue()
    exif = _exif(metadata).tobytes() if metadata is not None else b""
    if key == "jpeg":
        if image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=LOSSY_QUALITY, optimize=False, progressive=False, exif=exif)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buf, format="WEBP", quality=LOSSY_QUALITY, method=4, exact=False, exif=exif)
    return buf.getvalue()


def _exif(metadata: Mapping[str, str]) -> Image.Exif:
    fields = {name: str(value) for name, value in metadata.items()}
    exif = Image.Exif()
    if "prompt" in fields:
        exif[EXIF_IMAGE_DESCRIPTION] = fields["prompt"]  # ASCII only: readers show it; JSON is exact
    exif[EXIF_MAKE] = SOFTWARE
    if "model" in fields:
        exif[EXIF_MODEL] = fields["model"]
    exif[EXIF_SOFTWARE] = SOFTWARE
    comment = json.dumps(fields, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _ASCII_COMMENT + comment.encode("ascii")
    return exif


def read_image_metadata(data: bytes) -> dict[str, str]:
    """The metadata :func:`encode_image` wrote into a file (``{}`` when it has none).

    PNG: every text chunk. JPEG / WebP: the fields of the EXIF UserComment
    JSON, plus ``Software`` when present. Raises :class:`InvalidRequest` for
    data that is not a PNG, JPEG or WebP image.
    """
    try:
        with Image.open(io.BytesIO(data), formats=list(DECODABLE_FORMATS)) as image:
            if image.format == "PNG":
                image.load()  # text chunks after the image data are read on load
                text = getattr(image, "text", {}) or {}
                return {str(k): str(v) for k, v in text.items()}
            exif = image.getexif()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The file is not a readable image.") from exc
    fields: dict[str, str] = {}
    comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(_ASCII_COMMENT):
        try:
            parsed = json.loads(comment[len(_ASCII_COMMENT) :].decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            fields.update({str(k): str(v) for k, v in parsed.items()})
    software = exif.get(EXIF_SOFTWARE)
    if software:
        fields["Software"] = str(software).rstrip("\x00")
    return fields


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says."""

    format: str
    width: int
    height: int


def probe_image(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DECODABLE_FORMATS,
) -> ImageInfo:
    """Reads only an untrusted image's header: its format and size, or InvalidRequest.

    Cheap enough for the edge to check every input before anything is reserved;
    :func:`decode_image` decodes fully (and checks again).
    """
    if not data:
        raise InvalidRequest("The image is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest(f"The image file is {len(data)} bytes; the maximum is {max_bytes} bytes.")
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            width, height = image.size
            fmt = str(image.format)
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(_bomb_message(exc)) from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(f.lower() for f in formats)
        raise InvalidRequest(f"The file is not a supported image (accepted: {allowed}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The image could not be read; it may be truncated or corrupt.") from exc
    if width <= 0 or height <= 0:
        raise InvalidRequest("The image has no pixels.")
    if width * height > max_pixels:
        raise InvalidRequest(
            f"The image is too large: {width}x{height} pixels, the maximum is {max_pixels} pixels."
        )
    return ImageInfo(fmt.lower(), width, height)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DECODABLE_FORMATS,
) -> Image.Image:
    """Opens untrusted image bytes: a fully decoded, EXIF-upright image, or InvalidRequest.

    Refuses empty input, files over ``max_bytes``, anything that is not an
    image of ``formats``, images with more than ``max_pixels`` pixels (checked
    from the header, before decoding: a decompression bomb never allocates its
    pixels) and truncated or corrupt files. Safe to call from worker threads.
    """
    if not data:
        raise InvalidRequest("The image is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest(f"The image file is {len(data)} bytes; the maximum is {max_bytes} bytes.")
    try:
        # No warnings filter here: ``warnings.catch_warnings`` is process-global and
        # not thread-safe. Pillow raises DecompressionBombError by itself past twice
        # its own limit; below that, the header check right after opening refuses
        # anything over ``max_pixels`` before a pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=list(formats))
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidRequest("The image has no pixels.")
        if width * height > max_pixels:
            raise InvalidRequest(
                f"The image is too large: {width}x{height} pixels, the maximum is {max_pixels} pixels."
            )
        image.load()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(_bomb_message(exc)) from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(f.lower() for f in formats)
        raise InvalidRequest(f"The file is not a supported image (accepted: {allowed}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The image could not be decoded; it may be truncated or corrupt.") from exc
    return ImageOps.exif_transpose(image) or image


def _bomb_message(exc: Exception) -> str:
    return f"The image is too large to decode (a decompression bomb): {exc}"


# --- audio: 16-bit mono PCM to the speech API's response formats ---

#: Speech output formats (OpenAI's ``response_format``) and their MIME types.
AUDIO_MIME_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: PyAV (FFmpeg) container and codec of each compressed format.
_AV_AUDIO: dict[str, tuple[str, str]] = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}
#: Opus only takes a few rates; other PCM is resampled to this one.
OPUS_SAMPLE_RATE = 48000
_OPUS_RATES = (48000, 24000, 16000, 12000, 8000)
#: Bit rates of the lossy encoders, per channel.
_AUDIO_BIT_RATES: dict[str, int] = {"mp3": 64000, "opus": 32000, "aac": 64000}
#: Channel counts :func:`encode_audio` writes, and their FFmpeg layouts.
AUDIO_LAYOUTS: dict[int, str] = {1: "mono", 2: "stereo"}


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte RIFF/WAVE header for PCM; the default (unknown) length suits streaming,
    where the audio's size is not known when the header is sent."""
    block_align = channels * bits // 8
    riff_size = min(36 + data_bytes, 0xFFFFFFFF)
    return (
        b"RIFF"
        + riff_size.to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")  # PCM
        + channels.to_bytes(2, "little")
        + sample_rate.to_bytes(4, "little")
        + (sample_rate * block_align).to_bytes(4, "little")
        + block_align.to_bytes(2, "little")
        + bits.to_bytes(2, "little")
        + b"data"
        + min(data_bytes, 0xFFFFFFFF).to_bytes(4, "little")
    )


def audio_mime_type(fmt: str) -> str:
    """The MIME type of a speech output format; :class:`InvalidRequest` for an unknown one."""
    mime = AUDIO_MIME_TYPES.get(fmt.lower())
    if mime is None:
        raise InvalidRequest(f"Unknown audio format '{fmt}'; use one of {', '.join(AUDIO_MIME_TYPES)}")
    return mime


def encode_audio(pcm: bytes, sample_rate: int, fmt: str, *, channels: int = 1) -> tuple[bytes, str]:
    """Encodes 16-bit little-endian PCM as ``fmt`` (mp3, opus, aac, flac, wav or pcm).

    ``channels`` is 1 (mono) or 2 (stereo, samples interleaved left first).
    Returns the file's bytes and its MIME type. ``wav`` is written with the
    :mod:`wave` module, ``pcm`` is the input as it is, the others go through
    PyAV (FFmpeg): mp3 (LAME), opus (in Ogg, resampled to 48 kHz unless the
    rate is one Opus takes), aac (ADTS) and flac. Blocking: run it on a worker
    thread.
    """
    fmt = fmt.lower()
    mime = audio_mime_type(fmt)
    if channels not in AUDIO_LAYOUTS:
        raise ValueError(f"channels must be one of {', '.join(map(str, AUDIO_LAYOUTS))}, not {channels}")
    if len(pcm) % (2 * channels):
        raise ValueError(f"16-bit PCM of {channels} channel(s) must be a multiple of {2 * channels} bytes")
    if fmt == "pcm":
        return bytes(pcm), mime
    if fmt == "wav":
        import wave

        buf = io.BytesIO()
        with wave.open(buf, "wb") as out:
            out.setnchannels(channels)
            out.setsampwidth(2)
            out.setframerate(sample_rate)
            out.writeframes(pcm)
        return buf.getvalue(), mime
    return _encode_av(pcm, sample_rate, fmt, channels), mime


def _encode_av(pcm: bytes, sample_rate: int, fmt: str, channels: int = 1) -> bytes:
    import av
    import numpy as np

    container, codec = _AV_AUDIO[fmt]
    layout = AUDIO_LAYOUTS[channels]
    rate = sample_rate
    if fmt == "opus" and rate not in _OPUS_RATES:
        rate = OPUS_SAMPLE_RATE
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream: Any = out.add_stream(codec, rate=rate, layout=layout)
        if fmt in _AUDIO_BIT_RATES:
            stream.bit_rate = _AUDIO_BIT_RATES[fmt] * channels
        if fmt == "flac":
            stream.format = "s16"
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)  # packed s16: one plane, interleaved
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@dataclass(frozen=True)
class DecodedAudio:
    """Decoded audio: float32 samples in [-1, 1], shape ``(frames, channels)``."""

    samples: Any
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return int(self.samples.shape[0]) / self.sample_rate

    def mono(self) -> Any:
        """The channels averaged into one (a 1-D float32 array)."""
        return self.samples.mean(axis=1, dtype="float32")


#: Most channels an uploaded audio file may have (read from its header, before decoding):
#: 7.1, the largest layout FFmpeg downmixes without a channel map.
MAX_AUDIO_CHANNELS = 8
#: Most bytes of float samples one decoded upload may need: channels kept (at most 2)
#: x rate x the route's longest duration x 4, checked from the header before decoding.
MAX_DECODED_AUDIO_BYTES = 512 * 1024 * 1024
#: How much longer than the limit a header's duration may be before the file is refused
#: unread (durations estimated from a bit rate are approximate; decoding checks exactly).
HEADER_DURATION_SLACK_SECONDS = 1.0
#: Most samples per second of audio (channels x rate, from the header) a file may hold: what
#: decoding one second costs. 7.1 at 192 kHz passes; 8 channels at 384 kHz do not.
MAX_AUDIO_SAMPLES_PER_SECOND = 8 * 192_000


def decode_audio(
    data: bytes,
    *,
    max_seconds: float,
    max_bytes: int,
    field: str = "audio",
    sample_rate: int | None = None,
) -> DecodedAudio:
    """Decodes an untrusted audio file (WAV, FLAC, MP3, Ogg Vorbis/Opus, AAC...) with PyAV.

    The one place where uploaded audio is opened. Refuses with
    :class:`InvalidRequest`, naming ``field``: more than ``max_bytes`` bytes,
    data that is not audio, and, from the stream's header before a sample is
    decoded: more than :data:`MAX_AUDIO_CHANNELS` channels, a rate whose decode
    of ``max_seconds`` would pass :data:`MAX_DECODED_AUDIO_BYTES`, and a
    duration the header gives as longer than ``max_seconds`` (an 8-channel
    384 kHz FLAC of silence claiming gigabytes is refused before decoding).
    Then a file without a single sample, and audio longer than ``max_seconds``
    (headers may lie or say nothing: decoding stops as soon as the limit is
    passed, so a long file costs no more than the limit).

    Frames are converted one at a time by FFmpeg's resampler, as they decode,
    to packed float32: more than two channels downmixed to stereo (every caller
    wants mono or stereo) and, when ``sample_rate`` is given, resampled to it;
    each converted frame is copied into one buffer of ``max_seconds`` at the
    output rate, allocated once up front (only the pages written become
    memory). Packed, not planar: PyAV's planar frames of more than 8 channels
    carry a plane too many, and reading them crashed the process (a 7.1 FLAC
    did). Blocking, and untrusted: run it in a decode worker
    (:class:`services.common.decoding.DecodePool`).
    """
    import av
    import numpy as np

    if len(data) > max_bytes:
        raise InvalidRequest(f"'{field}' is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data:
        raise InvalidRequest(f"'{field}' is empty")
    too_long = f"'{field}' is longer than the limit of {max_seconds:g} seconds"
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest(f"'{field}' holds no audio stream")
            stream = container.streams.audio[0]
            channels, header_rate = int(stream.codec_context.channels), int(stream.codec_context.sample_rate)
            if channels > MAX_AUDIO_CHANNELS:
                raise InvalidRequest(
                    f"'{field}' has {channels} channels; at most {MAX_AUDIO_CHANNELS} are accepted"
                )
            if channels <= 0 or header_rate <= 0:
                raise InvalidRequest(f"'{field}' is not a readable audio file (WAV, FLAC, MP3 or Ogg)")
            kept = min(channels, 2)
            rate = sample_rate or header_rate
            if kept * max(rate, header_rate) * max_seconds * 4 > MAX_DECODED_AUDIO_BYTES:
                raise InvalidRequest(
                    f"'{field}' is sampled at {header_rate} Hz: too much audio to decode for {max_seconds:g} seconds"
                )
            if channels * header_rate > MAX_AUDIO_SAMPLES_PER_SECOND:
                raise InvalidRequest(
                    f"'{field}' has {channels} channels at {header_rate} Hz; at most "
                    f"{MAX_AUDIO_SAMPLES_PER_SECOND} samples per second (channels x rate) are accepted"
                )
            claimed = max(_header_seconds(container, stream), _wav_claimed_seconds(data))
            if claimed > max_seconds + HEADER_DURATION_SLACK_SECONDS:
                raise InvalidRequest(too_long)
            # Packed float, one plane of (samples x channels), whatever the source's format.
            convert = av.AudioResampler(
                format="flt", layout="stereo" if channels > 2 else None, rate=sample_rate or None
            )
            # Allocated at the first frame: the output rate is the decoder's, which may differ
            # from the header's (HE-AAC doubles it), unless ``sample_rate`` fixes it.
            buffer: Any = None
            frames = 0

            def take(converted: list[Any]) -> None:
                nonlocal buffer, frames, rate
                for frame in converted:
                    if buffer is None:
                        rate = int(frame.sample_rate)
                        if kept * rate * max_seconds * 4 > MAX_DECODED_AUDIO_BYTES:
                            raise InvalidRequest(
                                f"'{field}' is sampled at {rate} Hz: too much audio to decode "
                                f"for {max_seconds:g} seconds"
                            )
                        buffer = np.empty((math.floor(max_seconds * rate), kept), dtype=np.float32)
                    count = int(frame.samples)
                    if frames + count > buffer.shape[0]:
                        raise InvalidRequest(too_long)
                    array = frame.to_ndarray().reshape(-1, kept)  # (1, samples x channels) -> frames
                    buffer[frames : frames + count] = array[:count]
                    frames += count

            for decoded in container.decode(stream):
                take(convert.resample(decoded))
            take(convert.resample(None))
    except InvalidRequest:
        raise
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"'{field}' is not a readable audio file (WAV, FLAC, MP3 or Ogg)") from exc
    if not frames:
        raise InvalidRequest(f"'{field}' contains no audio samples")
    samples = buffer[:frames]
    np.clip(samples, -1.0, 1.0, out=samples)
    return DecodedAudio(samples=samples, sample_rate=rate)


def _wav_claimed_seconds(data: bytes) -> float:
    """The duration a RIFF/WAVE header claims for its ``data`` chunk (0 when unknown).

    FFmpeg reports a WAV's duration from the bytes actually there; a header that
    claims ten hours over a few kilobytes is refused for its claim. The sizes of
    a streamed WAV (``0xFFFFFFFF`` or 0: not known when the header was written)
    claim nothing.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0.0
    byte_rate = 0
    position = 12
    for _ in range(64):  # a few chunks precede the data; never walk far
        if position + 8 > len(data):
            return 0.0
        chunk, size = (
            data[position : position + 4],
            int.from_bytes(data[position + 4 : position + 8], "little"),
        )
        if chunk == b"fmt " and size >= 12 and position + 20 <= len(data):
            byte_rate = int.from_bytes(data[position + 16 : position + 20], "little")
        elif chunk == b"data":
            if size in (0, 0xFFFFFFFF) or byte_rate <= 0:
                return 0.0
            return size / byte_rate
        position += 8 + size + (size & 1)
    return 0.0


def _header_seconds(container: Any, stream: Any) -> float:
    """The duration the file's header claims (0 when it says none): the stream's, else the container's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / 1_000_000  # av.time_base
    return 0.0


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
