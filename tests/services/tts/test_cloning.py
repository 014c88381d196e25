"""Voice cloning with Qwen3-TTS (tiny random weights): streaming, languages, limits, bad references."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from kiln.tts.v1 import tts_service_pb2 as pb
from services.common.engine import EnginePool
from services.common.errors import InvalidRequest
from services.common.media.audio import encode_audio
from services.common.registry import DEFAULT_CLONE_MODEL, Registry
from services.tts.cloning import (
    FRAMES_PER_CHUNK,
    CloneEngine,
    CloneRequest,
    frame_budget,
)
from services.tts.engines import SpeechChunk, SpeechDone, pcm_of
from services.tts.tiny import build_tiny_qwen3_tts
from tests.services.tts.conftest import Tts

RATE = 24000
#: Samples per codec frame of the 12 Hz codec at 24 kHz.
FRAME = 1920
SHORT = "Hello there."
LONG = "Hello there, this is a much longer sentence, spoken in the cloned voice."


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def wav_file(seconds: float, rate: int = 16000) -> bytes:
    pcm = (tone(seconds, rate) * 32767).astype("<i2").tobytes()
    return encode_audio(pcm, rate, "wav")[0]


def cloner(pool: EnginePool) -> CloneEngine:
    engine = pool.get(DEFAULT_CLONE_MODEL)
    assert isinstance(engine, CloneEngine)
    return engine


def request(text: str = SHORT, **kwargs: Any) -> CloneRequest:
    fields: dict[str, object] = {
        "text": text,
        "ref_audio": tone(2.0),
        "ref_rate": 16000,
        "ref_text": "This is my voice.",
        "seed": 7,
    }
    fields.update(kwargs)
    return CloneRequest(**fields)  # type: ignore[arg-type]


async def test_tiny_model_loads_with_the_released_languages(speech_pool: EnginePool) -> None:
    engine = cloner(speech_pool)
    assert engine.ready and engine.sample_rate == RATE
    assert {"english", "chinese", "german"} <= set(engine.languages)
    assert engine.language_names()[:2] == ["Auto", "Chinese"]


async def test_streams_chunks_while_generating(speech_pool: EnginePool) -> None:
    engine = cloner(speech_pool)
    events = engine.run(request(LONG))
    first = await anext(events)
    # The first chunk is here while the job is still generating the rest.
    assert isinstance(first, SpeechChunk) and engine.runner.running == 1
    assert len(first.pcm) == FRAMES_PER_CHUNK * FRAME * 2
    rest = [event async for event in events]
    chunks = [first, *(e for e in rest if isinstance(e, SpeechChunk))]
    done = rest[-1]
    assert isinstance(done, SpeechDone) and done.sample_rate == RATE
    assert len(chunks) > 2 and done.samples * 2 == sum(len(c.pcm) for c in chunks)
    assert done.samples % FRAME == 0 and done.samples // FRAME <= frame_budget(LONG, engine.max_frames)


async def test_duration_grows_with_the_text_and_a_seed_repeats(speech_pool: EnginePool) -> None:
    engine = cloner(speech_pool)

    async def pcm(text: str, seed: int = 7) -> bytes:
        return b"".join([chunk async for chunk in pcm_of(engine.run(request(text, seed=seed)))])

    short, long = await pcm(SHORT), await pcm(LONG)
    assert len(long) > 2 * len(short) > 0
    assert await pcm(SHORT) == short


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": ""}, "'text' must not be empty"),
        ({"text": "  \n"}, "'text' must not be empty"),
        ({"text": "x" * 201}, "the limit is 200"),
        ({"ref_text": ""}, "'ref_text' must not be empty"),
        ({"language": "Klingon"}, "Unsupported language 'Klingon'. Supported languages: Auto, Chinese"),
    ],
)
async def test_bad_requests_are_invalid(
    speech_pool: EnginePool, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        await anext(cloner(speech_pool).run(request(**changes)))  # type: ignore[arg-type]


async def test_languages_are_case_insensitive_and_auto_is_accepted(speech_pool: EnginePool) -> None:
    engine = cloner(speech_pool)
    assert engine.check("Hi.", "Me.", "german") == "german"
    assert engine.check("Hi.", "Me.", "") == "English"
    assert engine.check("Hi.", "Me.", "AUTO") == "AUTO"


async def test_saved_tiny_model_loads_back_as_registry_weights(
    tts_registry: Registry, tmp_path: Path, speech_pool: EnginePool
) -> None:
    weights = tmp_path / "qwen3-tts"
    weights.mkdir()
    build_tiny_qwen3_tts(weights)
    assert (weights / "speech_tokenizer" / "config.json").is_file()
    spec = tts_registry.get(DEFAULT_CLONE_MODEL)
    assert spec is not None
    engine = CloneEngine(spec, weights_dir=weights, cache_dir=tmp_path / "unused", torch_threads=1)
    await engine.load()
    try:
        assert engine.ready, engine.unavailable_reason
        assert not (tmp_path / "unused").exists()  # loaded from the weights, nothing built
        pcm = b"".join([chunk async for chunk in pcm_of(engine.run(request("Hi.")))])
        assert len(pcm) > 0 and len(pcm) % (2 * FRAME) == 0
    finally:
        await engine.close()


async def test_missing_weights_directory_makes_the_model_unavailable(
    tts_registry: Registry, tmp_path: Path
) -> None:
    spec = tts_registry.get(DEFAULT_CLONE_MODEL)
    assert spec is not None
    engine = CloneEngine(spec, weights_dir=tmp_path / "nowhere", cache_dir=tmp_path, torch_threads=1)
    await engine.load()
    assert not engine.ready and "does not exist" in (engine.unavailable_reason or "")
    await engine.close()


# --- the CloneVoice RPC ---------------------------------------------------------------------


async def clone_rpc(tts: Tts, **fields: object) -> list[pb.CloneVoiceResponse]:
    call: dict[str, object] = {
        "text": SHORT,
        "ref_audio": wav_file(2.0),
        "ref_text": "This is my voice.",
        "seed": 3,
    }
    call.update(fields)
    return [event async for event in tts.stub.CloneVoice(pb.CloneVoiceRequest(**call))]  # type: ignore[arg-type]


async def test_clone_voice_streams_a_header_pcm_and_a_summary(tts: Tts) -> None:
    events = await clone_rpc(
        tts, ref_audio=encode_audio((tone(2.0) * 32767).astype("<i2").tobytes(), 16000, "mp3")[0]
    )
    assert events[0].header.sample_rate == RATE and events[0].header.voice == DEFAULT_CLONE_MODEL
    pcm = b"".join(e.pcm for e in events if e.HasField("pcm"))
    summary = events[-1].summary
    assert len([e for e in events if e.HasField("pcm")]) >= 2
    assert summary.samples * 2 == len(pcm) and summary.duration_seconds == pytest.approx(len(pcm) / 2 / RATE)
    with wave.open(io.BytesIO(encode_audio(pcm, RATE, "wav")[0])) as back:
        assert back.getframerate() == RATE and back.getnframes() == summary.samples


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ref_audio": b"this is not audio at all"}, "not a readable audio file"),
        ({"ref_audio": b""}, "'ref_audio' is empty"),
        ({"ref_audio": encode_audio(b"", 16000, "wav")[0]}, "contains no audio samples"),
        ({"ref_audio": wav_file(600, 8000)}, "longer than the limit of 30 seconds"),
        ({"ref_audio": wav_file(0.1)}, "at least 0.5 seconds"),
        ({"text": ""}, "'text' must not be empty"),
        ({"text": "y" * 301}, "the limit is 300"),
        ({"ref_text": ""}, "'ref_text' must not be empty"),
        ({"language": "Elvish"}, "Unsupported language 'Elvish'"),
        ({"model": "piper-joe"}, "Invalid model ID 'piper-joe'. Supported models: qwen3-tts-base"),
    ],
)
async def test_clone_voice_refuses_bad_input_before_streaming(
    tts: Tts, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clone_rpc(tts, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


async def test_list_voices_names_the_cloning_model_and_its_languages(tts: Tts) -> None:
    reply = await tts.stub.ListVoices(pb.ListVoicesRequest())
    voices = {voice.id: voice for voice in reply.voices}
    qwen = voices[DEFAULT_CLONE_MODEL]
    assert qwen.cloning and qwen.sample_rate == RATE and "English" in qwen.languages
    assert not voices["piper-joe"].cloning
