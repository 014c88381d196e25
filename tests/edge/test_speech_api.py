"""OpenAI's POST /v1/audio/speech with the real Piper voice, and GET /v1/audio/voices."""

from __future__ import annotations

import io
import wave
from typing import Any

import aiohttp
import av
import pytest

from tests.conftest import Mesh, balance, new_customer

SPEECH = "/v1/audio/speech"


def wav_info(data: bytes) -> tuple[int, float]:
    # The streamed WAV header says "length unknown"; count the samples from the body.
    with wave.open(io.BytesIO(data[:44] + b"")) as head:
        rate = head.getframerate()
    return rate, (len(data) - 44) / 2 / rate


def decoded_seconds(data: bytes) -> tuple[int, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, samples / stream.rate


async def test_the_openai_sdk_speaks_with_the_real_voice(mesh: Mesh) -> None:
    from openai import AsyncOpenAI

    customer = await new_customer(mesh, "5")
    client = AsyncOpenAI(api_key=customer.key, base_url=mesh.url + "/v1", max_retries=0)
    short = await client.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello.", response_format="wav"
    )
    long = await client.audio.speech.create(
        model="tts-1",
        voice="alloy",
        input="Hello. This is a longer sentence, spoken by Kiln.",
        response_format="wav",
    )
    rate, short_seconds = wav_info(short.content)
    _, long_seconds = wav_info(long.content)
    assert rate == 22050 and 0.2 < short_seconds < long_seconds
    await client.close()
    assert await balance(mesh, customer.account_id) == 500 - 2 * 10


@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus", "aac"])
async def test_each_format_decodes_at_the_voice_rate(
    mesh: Mesh, http: aiohttp.ClientSession, fmt: str
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"model": "tts-1", "voice": "piper-joe", "input": "Testing one two three.", "response_format": fmt}
    async with http.post(mesh.url + SPEECH, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        data = await response.read()
    rate, seconds = decoded_seconds(data)
    assert rate in (22050, 24000, 48000) and seconds > 0.5


async def test_speed_and_voices(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    lengths = []
    for speed in (1.0, 2.0):
        body = {
            "model": "tts-1",
            "voice": "joe",
            "input": "A sentence at two speeds.",
            "response_format": "pcm",
            "speed": speed,
        }
        async with http.post(mesh.url + SPEECH, json=body, headers=customer.headers) as response:
            assert response.status == 200
            lengths.append(len(await response.read()))
    assert lengths[1] < lengths[0]
    async with http.get(mesh.url + "/v1/audio/voices") as response:
        voices = (await response.json())["data"]
    assert voices[0]["id"] == "piper-joe" and "alloy" in voices[0]["aliases"]


BAD: list[tuple[dict[str, Any], str]] = [
    ({"model": "tts-1", "voice": "joe", "input": ""}, "'input' must not be empty"),
    ({"model": "tts-1", "voice": "joe", "input": "x" * 5000}, "longer than 4096 characters"),
    ({"model": "tts-9", "voice": "joe", "input": "hi"}, "Invalid model ID 'tts-9'"),
    ({"model": "tts-1", "voice": "nobody", "input": "hi"}, "Invalid voice 'nobody'"),
    ({"model": "tts-1", "voice": "joe", "input": "hi", "speed": 5}, "Invalid value for 'speed'"),
    (
        {"model": "tts-1", "voice": "joe", "input": "hi", "response_format": "ogg"},
        "Invalid value for 'response_format'",
    ),
    ({"voice": "joe", "input": "hi"}, "Missing required parameter: 'model'"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:30] for _, m in BAD])
async def test_bad_speech_is_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    async with http.post(mesh.url + SPEECH, json=body, headers=customer.headers) as response:
        payload = await response.json()
        assert response.status == 400, payload
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500
