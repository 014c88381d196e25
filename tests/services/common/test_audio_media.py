"""Audio media helpers (services.common.media): encode_audio and wav_header read back with their rate; decode_audio refuses what is not audio."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from services.common.errors import InvalidRequest
from services.common.media.audio import AUDIO_MIME_TYPES, decode_audio, encode_audio, wav_header

RATE = 22050


def tone(seconds: float = 1.0, rate: int = RATE) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


def read_back(data: bytes) -> tuple[str, int, int, int]:
    """(container, sample rate, channels, decoded samples) as PyAV reads the file."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, stream.rate, stream.channels, samples


@pytest.mark.parametrize(
    ("fmt", "container", "rate"),
    [
        ("wav", "wav", RATE),
        ("mp3", "mp3", RATE),
        ("aac", "aac", RATE),
        ("flac", "flac", RATE),
        ("opus", "ogg", 48000),
    ],
)
def test_formats_parse_with_the_right_rate(fmt: str, container: str, rate: int) -> None:
    data, mime = encode_audio(tone(1.0), RATE, fmt)
    assert mime == AUDIO_MIME_TYPES[fmt]
    name, got_rate, channels, samples = read_back(data)
    assert container in name.split(",")
    assert (got_rate, channels) == (rate, 1)
    assert abs(samples - rate) < 0.1 * rate  # one second, give or take codec padding


def test_flac_and_wav_are_lossless() -> None:
    pcm = tone(0.5)
    for fmt in ("wav", "flac"):
        data, _ = encode_audio(pcm, RATE, fmt)
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray() for f in container.decode(audio=0)]
        assert np.concatenate(frames, axis=1).astype("<i2").tobytes() == pcm


def test_opus_at_a_rate_it_takes_keeps_its_duration() -> None:
    data, _ = encode_audio(tone(0.5, 24000), 24000, "opus")
    _, rate, channels, samples = read_back(data)  # Ogg Opus always decodes at 48 kHz
    assert (rate, channels) == (48000, 1) and abs(samples - 24000) < 2400


def test_pcm_is_raw_and_wav_reads_with_the_wave_module() -> None:
    pcm = tone(0.25)
    assert encode_audio(pcm, RATE, "pcm") == (pcm, "audio/pcm")
    data, _ = encode_audio(pcm, RATE, "WAV")
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        assert w.readframes(w.getnframes()) == pcm


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "pcm"])
def test_empty_audio_encodes(fmt: str) -> None:
    data, _ = encode_audio(b"", RATE, fmt)
    assert isinstance(data, bytes)


def test_unknown_format_and_odd_pcm() -> None:
    with pytest.raises(InvalidRequest):
        encode_audio(tone(0.1), RATE, "ogg-vorbis")
    with pytest.raises(ValueError):
        encode_audio(b"\x00\x01\x02", RATE, "wav")


def test_wav_header_for_streaming_and_known_length() -> None:
    pcm = tone(0.25)
    header = wav_header(RATE, data_bytes=len(pcm))
    assert len(header) == 44 and header == encode_audio(pcm, RATE, "wav")[0][:44]
    with wave.open(io.BytesIO(header + pcm)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (RATE, 1, len(pcm) // 2)
    streaming = wav_header(RATE)  # unknown length: sizes at their maximum
    assert streaming[4:8] == b"\xff\xff\xff\xff" and streaming[40:44] == b"\xff\xff\xff\xff"
    name, rate, channels, samples = read_back(streaming + pcm)
    assert (name, rate, channels, samples) == ("wav", RATE, 1, len(pcm) // 2)
    assert wav_header(44100, channels=2, bits=16, data_bytes=8)[22:36] == (
        (2).to_bytes(2, "little")
        + (44100).to_bytes(4, "little")
        + (44100 * 4).to_bytes(4, "little")
        + (4).to_bytes(2, "little")
        + (16).to_bytes(2, "little")
    )


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_decode_audio_reads_every_output_format_back(fmt: str) -> None:
    data, _ = encode_audio(tone(1.0, 24000), 24000, fmt)
    decoded = decode_audio(data, max_seconds=5, max_bytes=1 << 20)
    assert decoded.channels == 1 and decoded.samples.dtype == np.float32
    assert decoded.duration == pytest.approx(1.0, abs=0.1)
    assert 0.2 < float(np.abs(decoded.mono()).max()) <= 1.0


def test_decode_audio_is_exact_for_wav() -> None:
    pcm = tone(0.5, 16000)
    decoded = decode_audio(encode_audio(pcm, 16000, "wav")[0], max_seconds=5, max_bytes=1 << 20)
    assert decoded.sample_rate == 16000
    assert np.array_equal((decoded.mono() * 32768).round().astype("<i2").tobytes(), pcm)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "'ref_audio' is empty"),
        (b"RIFF not really a wave file at all", "not a readable audio file"),
        (encode_audio(b"", 16000, "wav")[0], "contains no audio samples"),
        (b"\0" * 2048, "the limit is 1024 bytes"),
    ],
)
def test_decode_audio_refuses_what_is_not_audio(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_audio(data, max_seconds=5, max_bytes=1024, field="ref_audio")


def test_decode_audio_stops_at_the_duration_limit() -> None:
    ten_minutes = encode_audio(b"\0\0" * 8000 * 600, 8000, "wav")[0]
    with pytest.raises(InvalidRequest, match="longer than the limit of 60 seconds"):
        decode_audio(ten_minutes, max_seconds=60, max_bytes=len(ten_minutes))


def _multichannel(channels: int, fmt: str, rate: int = 48000, frames: int = 4800) -> tuple[bytes, np.ndarray]:
    import soundfile

    samples = ((np.arange(frames * channels).reshape(frames, channels) % 200) / 1000).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype="PCM_24")
    return buf.getvalue(), samples


_DECODE_IN_A_CHILD = """
import sys, numpy as np
from services.common.media.audio import decode_audio
data = sys.stdin.buffer.read()
decoded = decode_audio(data, max_seconds=5, max_bytes=1 << 24)
sys.stdout.buffer.write(np.ascontiguousarray(decoded.samples, dtype=np.float32).tobytes())
"""


@pytest.mark.parametrize(
    ("channels", "fmt"), [(c, "FLAC") for c in range(1, 9)] + [(c, "WAV") for c in (3, 8)]
)
def test_decode_audio_reads_every_channel_count_without_crashing(channels: int, fmt: str) -> None:
    """A 7.1 FLAC once killed the process (PyAV's planar frames of 8+ channels); decoded in a
    child process here, so a crash fails this test instead of the whole run. Mono and stereo
    come back exactly; more channels are downmixed to stereo."""
    import subprocess
    import sys

    data, expected = _multichannel(channels, fmt)
    child = subprocess.run(
        [sys.executable, "-c", _DECODE_IN_A_CHILD], input=data, capture_output=True, timeout=120
    )
    assert child.returncode == 0, child.stderr.decode()[-500:]
    kept = min(channels, 2)
    decoded = np.frombuffer(child.stdout, dtype=np.float32).reshape(-1, kept)
    assert decoded.shape == (expected.shape[0], kept)
    if channels <= 2:
        assert float(np.abs(decoded - expected).max()) < 1e-4
    else:  # a downmix of non-silent channels: not silent, and within range
        assert 0.01 < float(np.abs(decoded).max()) <= 1.0


@pytest.mark.parametrize("channels", [9, 12, 16, 32, 64])
def test_decode_audio_refuses_more_than_8_channels_before_decoding(channels: int) -> None:
    data, _ = _multichannel(channels, "WAV")
    with pytest.raises(InvalidRequest, match=f"has {channels} channels; at most 8 are accepted"):
        decode_audio(data, max_seconds=5, max_bytes=1 << 24)


def test_an_8_channel_384_khz_flac_is_refused_from_its_header() -> None:
    data, _ = _multichannel(8, "FLAC", rate=384000, frames=384000)  # 1 s of it: small on disk
    with pytest.raises(InvalidRequest, match="sampled at 384000 Hz: too much audio to decode for 600"):
        decode_audio(data, max_seconds=600, max_bytes=1 << 24)
