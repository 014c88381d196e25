"""TtsService over a real gRPC server: the stream's shape, speed, limits, voices."""

from __future__ import annotations

import pytest

from kiln.tts.v1 import tts_service_pb2 as pb
from tests.services.grpc_errors import expect_invalid
from tests.services.tts.conftest import SENTENCES, Tts


async def stream(tts: Tts, text: str, **kw: object) -> list[pb.SynthesizeResponse]:
    return [m async for m in tts.stub.Synthesize(pb.SynthesizeRequest(text=text, **kw))]  # type: ignore[arg-type]


def pcm_of(messages: list[pb.SynthesizeResponse]) -> bytes:
    return b"".join(m.pcm for m in messages if m.WhichOneof("event") == "pcm")


async def test_header_then_chunks_as_produced_then_summary(tts: Tts) -> None:
    messages = await stream(tts, SENTENCES, request_id="r-1")
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "header" and kinds[-1] == "summary"
    assert set(kinds[1:-1]) == {"pcm"}
    assert len(kinds) - 2 == 3  # one chunk per sentence, sent as each is produced
    header, summary = messages[0].header, messages[-1].summary
    assert (header.sample_rate, header.channels, header.voice) == (22050, 1, "piper-joe")
    pcm = pcm_of(messages)
    assert summary.samples * 2 == len(pcm) > 0
    assert summary.duration_seconds == pytest.approx(summary.samples / 22050)
    assert 0.5 < summary.duration_seconds < 15
    assert summary.synthesis_seconds > 0


async def test_more_text_gives_more_samples(tts: Tts) -> None:
    short = (await stream(tts, "Hello."))[-1].summary.samples
    long = (await stream(tts, "Hello. " + SENTENCES))[-1].summary.samples
    assert long > 1.5 * short


async def test_speed_two_gives_fewer_samples(tts: Tts) -> None:
    normal = (await stream(tts, SENTENCES, speed=1.0))[-1].summary.samples
    default = (await stream(tts, SENTENCES))[-1].summary.samples
    fast = (await stream(tts, SENTENCES, speed=2.0))[-1].summary.samples
    assert fast < 0.75 * normal and fast < 0.75 * default


async def test_an_alias_names_the_voice(tts: Tts) -> None:
    messages = await stream(tts, "Hi.", voice="alloy")
    assert messages[0].header.voice == "piper-joe"


async def expect_invalid_speech(tts: Tts, text: str, *words: str, **kw: object) -> None:
    await expect_invalid(stream(tts, text, **kw), *words)


async def test_empty_text_is_invalid(tts: Tts) -> None:
    await expect_invalid_speech(tts, "", "empty")
    await expect_invalid_speech(tts, "  \n ", "empty")


async def test_text_over_the_limit_is_invalid(tts: Tts) -> None:
    assert tts.settings.max_speech_chars == 300
    await expect_invalid_speech(tts, "a" * 301, "301", "300")
    assert (await stream(tts, "Hi. " + "a" * 296))[-1].summary.samples > 0  # exactly at the limit


async def test_bad_speed_and_unknown_voice_are_invalid(tts: Tts) -> None:
    await expect_invalid_speech(tts, "Hi.", "speed", speed=0.2)
    await expect_invalid_speech(tts, "Hi.", "speed", speed=4.5)
    await expect_invalid_speech(tts, "Hi.", "no-such-voice", voice="no-such-voice")


async def test_list_voices(tts: Tts) -> None:
    reply = await tts.stub.ListVoices(pb.ListVoicesRequest())
    voices = {v.id: v for v in reply.voices}
    assert set(voices) == {"piper-joe", "qwen3-tts-base"}
    joe = voices["piper-joe"]
    assert (joe.language, joe.sample_rate) == ("en_US", 22050) and "joe" in joe.description
