"""decode_audio bounds channels x rate x duration from the header, and decodes into one buffer.

(Channel counts 1-8 and more, and the 7.1 crash, are in test_audio_media.py.)
"""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest
import soundfile

from services.common.decoding import DecodePool
from services.common.errors import InvalidRequest
from services.common.media.audio import MAX_AUDIO_SAMPLES_PER_SECOND, decode_audio, encode_audio, wav_header


def silent_flac(rate: int, channels: int, seconds: int, *, claim_seconds: int | None = None) -> bytes:
    """Real FLAC silence; ``claim_seconds`` rewrites STREAMINFO's total sample count."""
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC") as out:
        second = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(seconds):
            out.write(second)
    data = bytearray(buf.getvalue())
    if claim_seconds is not None:  # "fLaC", block header, STREAMINFO: total = low 36 bits of bytes 10-17
        field = int.from_bytes(data[18:26], "big")
        field = (field & ~((1 << 36) - 1)) | (claim_seconds * rate)
        data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def flac_bomb() -> bytes:
    """A minute of 8-channel 384 kHz silence (a few hundred KB) whose header claims an hour:
    8 x 384000 x 3600 samples, 22 GB of 16-bit PCM."""
    return silent_flac(384000, 8, 60, claim_seconds=3600)


@pytest.mark.parametrize("max_seconds", [20, 60, 600])
def test_an_8_channel_384_khz_flac_of_silence_is_a_fast_400(flac_bomb: bytes, max_seconds: int) -> None:
    assert len(flac_bomb) < 1024 * 1024
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as refused:
        decode_audio(flac_bomb, max_seconds=max_seconds, max_bytes=len(flac_bomb))
    assert time.perf_counter() - started < 1.0  # the issue asks for a fast 400: refused from the header
    assert "384000 Hz" in refused.value.message


async def test_the_flac_bomb_is_a_fast_400_through_a_decode_worker_too(flac_bomb: bytes) -> None:
    pool = DecodePool(1)
    try:
        with pytest.raises(InvalidRequest, match=r"'source_audio' .* 384000 Hz"):
            await pool.run(
                "'source_audio'",
                decode_audio,
                flac_bomb,
                max_seconds=600,
                max_bytes=len(flac_bomb),
                field="source_audio",
            )
    finally:
        pool.close()
    assert pool.crashes == 0


def test_channels_times_rate_is_bounded_from_the_header() -> None:
    ok = silent_flac(192000, 8, 1)  # 7.1 at 192 kHz: the most accepted
    assert decode_audio(ok, max_seconds=5, max_bytes=1 << 24).channels == 2
    hi_res = silent_flac(96000, 2, 1)
    assert decode_audio(hi_res, max_seconds=5, max_bytes=1 << 24).sample_rate == 96000
    with pytest.raises(InvalidRequest, match=f"at most {MAX_AUDIO_SAMPLES_PER_SECOND} samples per second"):
        decode_audio(silent_flac(352800, 6, 1), max_seconds=5, max_bytes=1 << 24)


def test_a_duration_claimed_by_the_header_past_the_limit_is_refused_unread() -> None:
    eleven_minutes = silent_flac(8000, 1, 660)
    with pytest.raises(InvalidRequest, match="longer than the limit of 600 seconds"):
        decode_audio(eleven_minutes, max_seconds=600, max_bytes=len(eleven_minutes))
    # a header claiming an hour over one real second: refused for its claim
    claims = silent_flac(8000, 1, 1, claim_seconds=3600)
    with pytest.raises(InvalidRequest, match="longer than the limit of 60 seconds"):
        decode_audio(claims, max_seconds=60, max_bytes=len(claims))


def test_a_wav_header_claiming_ten_hours_is_refused_though_ffmpeg_sees_one_second() -> None:
    ten_hours = wav_header(8000, data_bytes=8000 * 2 * 3600 * 10) + b"\0\0" * 8000
    with pytest.raises(InvalidRequest, match="longer than the limit of 60 seconds"):
        decode_audio(ten_hours, max_seconds=60, max_bytes=len(ten_hours))


def test_a_streamed_wav_of_unknown_length_is_stopped_at_the_limit_while_decoding() -> None:
    streamed_header = wav_header(8000)  # data size 0xFFFFFFFF: written before the length was known
    one_second = streamed_header + b"\0\1" * 8000
    assert decode_audio(one_second, max_seconds=5, max_bytes=1 << 20).duration == pytest.approx(1.0)
    ten_minutes = streamed_header + b"\0\1" * 8000 * 600
    with pytest.raises(InvalidRequest, match="longer than the limit of 60 seconds"):
        decode_audio(ten_minutes, max_seconds=60, max_bytes=len(ten_minutes))


def test_decoding_resamples_to_the_asked_rate_as_it_goes() -> None:
    rate, seconds = 44100, 2.0
    t = np.arange(int(rate * seconds)) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 1000 * t), 0.25 * np.sin(2 * np.pi * 500 * t)
    pcm = (np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes()
    wav = encode_audio(pcm, rate, "wav", channels=2)[0]
    decoded = decode_audio(wav, max_seconds=5, max_bytes=1 << 24, sample_rate=48000)
    assert decoded.sample_rate == 48000 and decoded.channels == 2
    assert decoded.samples.shape[0] == pytest.approx(48000 * seconds, abs=64)
    for channel, hertz in ((0, 1000), (1, 500)):
        spectrum = np.abs(np.fft.rfft(decoded.samples[:48000, channel]))
        assert int(np.argmax(spectrum)) == hertz  # 1 Hz bins over one second


def test_decoding_holds_the_samples_once_in_a_preallocated_buffer() -> None:
    """No list of chunks joined at the end (which held every sample twice): the frames are
    copied into one buffer of the limit's size as they decode."""
    rate, seconds = 48000, 10
    pcm = (np.random.default_rng(1).normal(0, 3000, (rate * seconds, 2))).astype("<i2").tobytes()
    flac = encode_audio(pcm, rate, "flac", channels=2)[0]
    buffer_bytes = rate * seconds * 2 * 4  # max_seconds x rate x 2 channels of float32
    tracemalloc.start()
    try:
        decoded = decode_audio(flac, max_seconds=seconds, max_bytes=len(flac))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.samples.shape == (rate * seconds, 2)
    print(
        f"\ndecoding {seconds} s of 48 kHz stereo FLAC: peak {peak / 1e6:.1f} MB, samples {buffer_bytes / 1e6:.1f} MB"
    )
    assert peak < buffer_bytes * 1.25
