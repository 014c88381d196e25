"""Audio: 16-bit PCM to the response formats, and the bounded decoder of untrusted recordings.

``encode_audio`` writes 16-bit PCM, mono (speech) or interleaved stereo
(music), as the audio response formats; ``decode_audio`` bounds channels, rate
and duration from the stream header before decoding anything.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequest

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
