"""MusicService over real gRPC: stream shape, durations, determinism, cover, repaint, errors,
cancellation, health and the model list."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from kiln.music.v1 import music_service_pb2 as pb
from services.common.media.audio import encode_audio
from services.music.engines import CROSSFADE_SECONDS
from services.music.servicer import SERVICE_NAME
from tests.services.grpc_errors import expect_invalid

from .conftest import CHANNELS, HOP, RATE, Music, song, wav

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Outcome:
    kinds: list[str]
    progress: list[tuple[int, int]]
    result: pb.GeneratedMusic
    pcm: bytes

    @property
    def audio(self) -> np.ndarray:
        """int16 ``(samples, channels)``."""
        return np.frombuffer(self.pcm, dtype="<i2").reshape(-1, self.result.channels)


async def collect(stream: AsyncIterable[Any]) -> Outcome:
    kinds: list[str] = []
    progress: list[tuple[int, int]] = []
    result: pb.GeneratedMusic | None = None
    pcm = bytearray()
    async for message in stream:
        kind = message.WhichOneof("event")
        kinds.append(kind)
        if kind == "progress":
            progress.append((message.progress.step, message.progress.total_steps))
        elif kind == "result":
            result = message.result
        else:
            pcm += message.pcm
    assert result is not None
    return Outcome(kinds, progress, result, bytes(pcm))


async def generate(music: Music, **kw: Any) -> Outcome:
    kw.setdefault("prompt", "lo-fi piano with soft drums")
    kw.setdefault("num_inference_steps", 2)
    return await collect(music.stub.GenerateMusic(pb.GenerateMusicRequest(**kw)))


async def cover(music: Music, source: bytes, **kw: Any) -> Outcome:
    kw.setdefault("prompt", "the same song as a jazz trio")
    kw.setdefault("num_inference_steps", 2)
    return await collect(music.stub.CoverMusic(pb.CoverMusicRequest(source_audio=source, **kw)))


async def repaint(music: Music, source: bytes, **kw: Any) -> Outcome:
    kw.setdefault("prompt", "a guitar solo")
    kw.setdefault("num_inference_steps", 2)
    return await collect(music.stub.RepaintMusic(pb.RepaintMusicRequest(source_audio=source, **kw)))


async def test_generate_streams_every_step_then_the_result_then_pcm(music: Music) -> None:
    out = await generate(music, duration_seconds=1.5, num_inference_steps=3, seed=11, request_id="shape")
    assert out.progress == [(1, 3), (2, 3), (3, 3)]
    assert out.kinds[:4] == ["progress", "progress", "progress", "result"]
    assert set(out.kinds[4:]) == {"pcm"}
    result = out.result
    assert (result.sample_rate, result.channels, result.model) == (RATE, CHANNELS, "ace-step-v1.5")
    assert (result.seed, result.num_inference_steps) == (11, 3)
    assert result.pcm_bytes == len(out.pcm) == result.samples * CHANNELS * 2
    assert result.duration_seconds == pytest.approx(result.samples / RATE)
    assert result.timing.inference_ms > 0 and result.timing.encode_ms >= 0
    peak = int(np.abs(out.audio.astype(np.int32)).max())
    assert 1000 < peak <= 32767  # real audio, not silence


@pytest.mark.parametrize("seconds", [1.0, 1.37, 2.01])
async def test_the_output_lasts_the_requested_duration(music: Music, seconds: float) -> None:
    out = await generate(music, duration_seconds=seconds, seed=1)
    assert abs(out.result.samples - seconds * RATE) <= HOP  # within one frame of the model's hop
    assert out.result.samples == round(seconds * RATE)  # in fact trimmed to the sample


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac"])
async def test_generated_stereo_encodes_to_every_format_at_the_requested_duration(
    music: Music, fmt: str
) -> None:
    out = await generate(music, duration_seconds=2.0, seed=5)
    data, _ = encode_audio(out.pcm, out.result.sample_rate, fmt, channels=out.result.channels)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == 2
        decoded = sum(frame.samples for frame in container.decode(stream))
        rate = stream.codec_context.sample_rate
    assert rate == RATE
    assert abs(decoded - 2.0 * RATE) <= HOP, (fmt, decoded)


async def test_the_same_seed_gives_the_same_audio_and_another_seed_other_audio(music: Music) -> None:
    first = await generate(
        music, duration_seconds=1.0, seed=42, bpm=120, key_scale="C Major", time_signature="4/4"
    )
    again = await generate(
        music, duration_seconds=1.0, seed=42, bpm=120, key_scale="C Major", time_signature="4/4"
    )
    other = await generate(
        music, duration_seconds=1.0, seed=43, bpm=120, key_scale="C Major", time_signature="4/4"
    )
    assert first.pcm == again.pcm
    assert first.pcm != other.pcm
    drawn = await generate(music, duration_seconds=1.0)
    replayed = await generate(music, duration_seconds=1.0, seed=drawn.result.seed)
    assert replayed.pcm == drawn.pcm


async def test_the_conditions_reach_the_model(music: Music) -> None:
    base = await generate(music, duration_seconds=1.0, seed=9, prompt="calm ambient pads")
    other_prompt = await generate(music, duration_seconds=1.0, seed=9, prompt="fast heavy metal")
    lyrics = await generate(
        music, duration_seconds=1.0, seed=9, prompt="calm ambient pads", lyrics="[verse] la la"
    )
    instrumental = await generate(
        music, duration_seconds=1.0, seed=9, prompt="calm ambient pads", instrumental=True
    )
    key = await generate(
        music, duration_seconds=1.0, seed=9, prompt="calm ambient pads", key_scale="F# minor"
    )
    assert len({base.pcm, other_prompt.pcm, lyrics.pcm, instrumental.pcm, key.pcm}) == 5


async def test_a_cover_keeps_the_duration_of_the_source_and_is_repeatable(music: Music) -> None:
    source = song(1.234)  # not a whole number of VAE hops
    out = await cover(music, wav(source), seed=3, audio_cover_strength=0.7)
    assert out.result.samples == source.shape[0]
    assert out.result.channels == CHANNELS
    again = await cover(music, wav(source), seed=3, audio_cover_strength=0.7)
    assert again.pcm == out.pcm
    full = await cover(music, wav(source), seed=3)
    assert full.pcm != out.pcm  # the strength changes the result
    assert not np.array_equal(out.audio, source)


async def test_a_mono_source_at_another_rate_is_converted(music: Music) -> None:
    source = song(1.5, rate=22050, channels=1)
    out = await cover(music, wav(source, rate=22050), seed=4)
    assert out.result.sample_rate == RATE and out.result.channels == CHANNELS
    assert abs(out.result.samples - 1.5 * RATE) <= 2 * RATE / 22050 + 1


async def test_repaint_keeps_the_outside_exactly_and_changes_the_inside(music: Music) -> None:
    source = song(2.5)
    start, end = 0.8, 1.6
    out = await repaint(music, wav(source), start_seconds=start, end_seconds=end, seed=5)
    audio = out.audio
    assert audio.shape == source.shape
    s, e = round(start * RATE), round(end * RATE)
    assert np.array_equal(audio[:s], source[:s])
    assert np.array_equal(audio[e:], source[e:])
    fade = round(CROSSFADE_SECONDS * RATE)
    inner_new = audio[s + fade : e - fade].astype(np.float64) / 32768
    inner_old = source[s + fade : e - fade].astype(np.float64) / 32768
    assert np.mean(np.abs(inner_new - inner_old)) > 0.05  # regenerated, not the source
    # The crossfade starts and ends at the source: the edges move by a fraction of a step.
    edge = np.abs(audio[[s, e - 1]].astype(np.int32) - source[[s, e - 1]].astype(np.int32))
    step = np.abs(audio[[s + fade, e - fade - 1]].astype(np.int32) - source[[s + fade, e - fade - 1]])
    assert edge.max() <= step.max() / 10 + 2
    again = await repaint(music, wav(source), start_seconds=start, end_seconds=end, seed=5)
    assert again.pcm == out.pcm


async def test_repaint_without_an_end_runs_to_the_end_of_the_song(music: Music) -> None:
    source = song(1.5)
    out = await repaint(music, wav(source), start_seconds=1.0, seed=6)
    s = round(1.0 * RATE)
    assert out.audio.shape == source.shape
    assert np.array_equal(out.audio[:s], source[:s])
    assert not np.array_equal(out.audio[s:], source[s:])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"bpm": 0}, ("bpm", "30", "300")),
        ({"bpm": 301}, ("bpm",)),
        ({"key_scale": "H Major"}, ("key_scale", "H Major")),
        ({"key_scale": "C dorian"}, ("key_scale",)),
        ({"time_signature": "5/0"}, ("time_signature", "5/0")),
        ({"time_signature": "four"}, ("time_signature",)),
        ({"duration_seconds": 601}, ("duration", "600")),
        ({"duration_seconds": 0}, ("duration",)),
        ({"duration_seconds": 0.5}, ("duration", "1")),
        ({"duration_seconds": float("nan")}, ("duration",)),
        ({"prompt": "  "}, ("prompt",)),
        ({"prompt": "x" * 4001}, ("prompt", "4000")),
        ({"lyrics": "la " * 2000}, ("lyrics", "4096")),
        ({"instrumental": True, "lyrics": "[verse] hello"}, ("lyrics", "instrumental")),
        ({"vocal_language": "English!"}, ("vocal_language",)),
        ({"num_inference_steps": 0}, ("num_inference_steps",)),
        ({"num_inference_steps": 51}, ("num_inference_steps", "50")),
        ({"seed": -1}, ("seed",)),
        ({"model": "no-such-model"}, ("no-such-model", "ace-step-v1.5")),
        ({"model": "z-image-turbo"}, ("z-image-turbo",)),
    ],
)
async def test_bad_generate_requests_are_invalid(
    music: Music, fields: dict[str, Any], words: tuple[str, ...]
) -> None:
    request = {"prompt": "synth pop", "duration_seconds": 1.0, "num_inference_steps": 1, **fields}
    await expect_invalid(collect(music.stub.GenerateMusic(pb.GenerateMusicRequest(**request))), *words)


async def test_good_spellings_of_key_time_signature_and_language_are_accepted(music: Music) -> None:
    for key, signature, language in [
        ("c major", "3/4", "zh"),
        ("Bb MINOR", "6/8", "unknown"),
        ("F#  minor", " 12/8 ", "pt-br"),
    ]:
        out = await generate(
            music,
            duration_seconds=1.0,
            num_inference_steps=1,
            key_scale=key,
            time_signature=signature,
            vocal_language=language,
        )
        assert out.result.samples == RATE


def source_file(kind: str) -> bytes:
    """A source song for the cover error cases."""
    if kind == "silent":  # a valid WAV header without a single sample
        return encode_audio(b"", RATE, "wav", channels=2)[0]
    if kind == "short":
        return wav(song(0.5))
    if kind == "long":  # 601 s, at 8 kHz mono to keep the file small
        return wav(song(601, rate=8000, channels=1), rate=8000)
    if kind == "big":  # over the test server's byte limit
        return b"RIFF" + bytes(17 * 1024 * 1024)
    return wav(song(1.2))


@pytest.mark.parametrize(
    ("source", "fields", "words"),
    [
        (b"not audio at all, just some text", {}, ("source_audio",)),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), {}, ("source_audio",)),
        (b"", {}, ("source_audio", "empty")),
        ("silent", {}, ("source_audio",)),
        ("short", {}, ("source song", "1")),
        ("long", {}, ("source_audio", "600")),
        ("big", {}, ("source_audio", "bytes")),
        ("song", {"audio_cover_strength": 1.5}, ("audio_cover_strength",)),
        ("song", {"audio_cover_strength": -0.1}, ("audio_cover_strength",)),
        ("song", {"prompt": ""}, ("prompt",)),
        ("song", {"time_signature": "5/0"}, ("time_signature",)),
    ],
)
async def test_bad_cover_requests_are_invalid(
    music: Music, source: bytes | str, fields: dict[str, Any], words: tuple[str, ...]
) -> None:
    data = source_file(source) if isinstance(source, str) else source
    request = {"prompt": "jazz", "num_inference_steps": 1, **fields}
    await expect_invalid(
        collect(music.stub.CoverMusic(pb.CoverMusicRequest(source_audio=data, **request))), *words
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"start_seconds": 1.0, "end_seconds": 1.0}, ("end", "after", "start")),
        ({"start_seconds": 1.0, "end_seconds": 0.5}, ("end", "after", "start")),
        ({"start_seconds": 0.5, "end_seconds": 5.0}, ("beyond", "2")),
        ({"start_seconds": 2.5}, ("beyond",)),
        ({"start_seconds": -0.5, "end_seconds": 1.0}, ("start",)),
        ({"start_seconds": 1.0, "end_seconds": 1.01}, ("at least", "0.04")),
        ({"start_seconds": 0.5, "end_seconds": 1.0, "bpm": 0}, ("bpm",)),
        ({"start_seconds": 0.5, "end_seconds": 1.0, "key_scale": "H Major"}, ("key_scale",)),
    ],
)
async def test_bad_repaint_requests_are_invalid(
    music: Music, fields: dict[str, Any], words: tuple[str, ...]
) -> None:
    request = {"prompt": "a solo", "num_inference_steps": 1, **fields}
    source = wav(song(2.0))
    call = music.stub.RepaintMusic(pb.RepaintMusicRequest(source_audio=source, **request))
    await expect_invalid(collect(call), *words)


async def test_a_repaint_with_a_source_that_is_not_audio_is_invalid(music: Music) -> None:
    call = music.stub.RepaintMusic(
        pb.RepaintMusicRequest(source_audio=b"hello", prompt="x", start_seconds=0.1, end_seconds=0.5)
    )
    await expect_invalid(collect(call), "source_audio")


def _report(music: Music, request_id: str) -> Any:
    reports = [r for r in music.pool.engines["ace-step-v1.5"].runner.reports if r.key == request_id]
    assert len(reports) == 1
    return reports[0]


async def test_cancelling_the_call_stops_the_pipeline_at_the_next_step(music: Music) -> None:
    call = music.stub.GenerateMusic(
        pb.GenerateMusicRequest(
            prompt="epic", duration_seconds=20, num_inference_steps=50, request_id="cancel-me"
        )
    )
    first = await call.read()
    assert (first.progress.step, first.progress.total_steps) == (1, 50)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    after = await generate(music, duration_seconds=1.0, seed=1)  # served once the cancelled job let go
    assert after.result.samples == RATE
    report = _report(music, "cancel-me")
    assert report.outcome == "cancelled"
    assert 1 <= report.steps_done < 50


async def test_health_is_serving_and_the_model_list_shows_the_loaded_model(music: Music) -> None:
    for name in ("", SERVICE_NAME):
        reply = await music.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == SERVING
    models = {m.id: m for m in (await music.stub.ListModels(pb.ListModelsRequest())).models}
    model = models["ace-step-v1.5"]
    assert model.ready and not model.unavailable_reason
    assert (model.sample_rate, model.channels) == (RATE, CHANNELS)
    assert (model.max_duration_seconds, model.default_steps, model.max_steps) == (600, 8, 50)
    assert "ace-step" in model.aliases
    by_alias = await generate(music, model="ace-step", duration_seconds=1.0, seed=42)
    by_id = await generate(music, duration_seconds=1.0, seed=42)
    assert by_alias.pcm == by_id.pcm and by_alias.result.model == "ace-step-v1.5"
