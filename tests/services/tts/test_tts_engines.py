"""The Piper engine on the real voice: streaming, speed, limits."""

from __future__ import annotations

import pytest

from services.common.engine import EnginePool
from services.common.errors import InvalidRequest
from services.tts.engines import DEFAULT_SPEECH_MODEL, PiperEngine, SpeechDone, SpeechRequest, pcm_of
from tests.services.tts.conftest import SENTENCES


def engine(pool: EnginePool) -> PiperEngine:
    found = pool.get(DEFAULT_SPEECH_MODEL)
    assert isinstance(found, PiperEngine)
    return found


async def samples(pool: EnginePool, text: str, speed: float = 1.0) -> list[bytes]:
    return [chunk async for chunk in pcm_of(engine(pool).run(SpeechRequest(text, speed)))]


async def test_voice_loads_from_the_package(speech_pool: EnginePool) -> None:
    piper = engine(speech_pool)
    assert piper.ready and piper.sample_rate == 22050 and piper.language == "en_US"


async def test_one_chunk_per_sentence_as_produced(speech_pool: EnginePool) -> None:
    chunks = await samples(speech_pool, SENTENCES)
    assert len(chunks) == 3
    assert all(len(c) > 0 and len(c) % 2 == 0 for c in chunks)


async def test_more_text_more_samples_and_faster_fewer(speech_pool: EnginePool) -> None:
    short = sum(map(len, await samples(speech_pool, "Hello there.")))
    long = sum(map(len, await samples(speech_pool, "Hello there. " + SENTENCES)))
    assert long > short * 1.5
    normal = sum(map(len, await samples(speech_pool, SENTENCES, 1.0)))
    fast = sum(map(len, await samples(speech_pool, SENTENCES, 2.0)))
    assert fast < normal * 0.75


async def test_run_ends_with_a_summary(speech_pool: EnginePool) -> None:
    from services.tts.engines import SpeechChunk, SpeechRequest

    events = [e async for e in engine(speech_pool).run(SpeechRequest("One. Two."))]
    assert isinstance(events[-1], SpeechDone)
    pcm = sum(len(e.pcm) for e in events if isinstance(e, SpeechChunk))
    assert events[-1].samples * 2 == pcm and events[-1].sample_rate == 22050


@pytest.mark.parametrize(
    ("text", "speed"), [("", 1.0), ("   \n", 1.0), ("x" * 201, 1.0), ("Hi.", 0.1), ("Hi.", 4.5)]
)
async def test_bad_input_is_invalid(speech_pool: EnginePool, text: str, speed: float) -> None:
    with pytest.raises(InvalidRequest):
        await samples(speech_pool, text, speed)
