"""POST /v1/audio/clone through the edge: WAV whole or streamed, stored for Range requests, 1 credit, bad input free."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from typing import Any

import aiohttp
import numpy as np
import pytest

from services.common.media.audio import encode_audio
from tests.conftest import Mesh, balance, new_customer

CLONE = "/v1/audio/clone"
RATE = 24000
#: 44-byte WAV header, then 16-bit mono PCM.
HEADER = 44


def reference(seconds: float = 2.0, rate: int = 16000, fmt: str = "wav") -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes()
    return base64.b64encode(encode_audio(pcm, rate, fmt)[0]).decode()


@pytest.fixture(autouse=True)
async def clone_ready(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    """The voice-cloning model loads after the default voice: wait until it is listed with languages."""
    async with asyncio.timeout(180):
        while True:
            async with http.get(mesh.url + "/v1/audio/clone/languages") as response:
                if any(model["languages"] for model in (await response.json())["data"]):
                    return
            await asyncio.sleep(0.2)


def body(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "text": "Hello, this is a test.",
        "ref_audio": reference(),
        "ref_text": "Reference text here",
        "language": "English",
        "stream": False,
        "seed": 11,
    }
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not None}


def wav_frames(data: bytes) -> tuple[int, int, int]:
    """(rate, channels, samples) of a complete WAV file."""
    with wave.open(io.BytesIO(data)) as wav:
        return wav.getframerate(), wav.getnchannels(), wav.getnframes()


async def test_clone_returns_a_wav_attachment_and_charges_one_credit(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    async with http.post(mesh.url + CLONE, json=body(), headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "audio/wav"
        assert response.headers["Content-Disposition"] == 'attachment; filename="cloned_voice.wav"'
        assert response.headers["X-Credits-Charged"] == "1"
        data = await response.read()
        location = response.headers["Content-Location"]
    rate, channels, samples = wav_frames(data)
    assert (rate, channels) == (RATE, 1) and samples > RATE // 2
    assert await balance(mesh, customer.account_id) == 500 - 100
    async with http.get(mesh.url + location) as stored:
        assert stored.status == 200 and await stored.read() == data


async def test_more_text_gives_longer_audio(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    lengths = []
    for text in ("Hi there.", "Hi there. This sentence is a good deal longer than the first one."):
        async with http.post(mesh.url + CLONE, json=body(text=text), headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            lengths.append(wav_frames(await response.read())[2])
    assert lengths[1] > 2 * lengths[0] > 0


async def test_streamed_clone_arrives_in_chunks_and_is_stored_for_ranges(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    text = "A longer text, so that the speech comes out in several chunks while it is generated."
    async with http.post(
        mesh.url + CLONE, json=body(text=text, stream=True), headers=customer.headers
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["Content-Disposition"] == 'attachment; filename="cloned_voice.wav"'
        location = response.headers["Content-Location"]
        first = await response.content.readany()
        assert first[:4] == b"RIFF" and not response.content.at_eof()
        streamed = first + await response.read()
    with wave.open(io.BytesIO(streamed[:HEADER])) as head:
        assert (head.getframerate(), head.getnchannels()) == (RATE, 1)
    async with http.get(mesh.url + location) as stored:
        assert stored.status == 200 and stored.headers["Content-Type"] == "audio/wav"
        assert stored.headers["Accept-Ranges"] == "bytes"
        whole = await stored.read()
    # The stored file is the same audio with its real length in the header.
    assert whole[HEADER:] == streamed[HEADER:] and wav_frames(whole)[2] == (len(whole) - HEADER) // 2
    async with http.get(mesh.url + location, headers={"Range": "bytes=44-1067"}) as part:
        assert part.status == 206
        assert part.headers["Content-Range"] == f"bytes 44-1067/{len(whole)}"
        assert await part.read() == whole[44:1068]
    async with http.get(mesh.url + location, headers={"Range": f"bytes=-{100}"}) as tail:
        assert tail.status == 206 and await tail.read() == whole[-100:]
    assert await balance(mesh, customer.account_id) == 500 - 100


async def test_premium_accounts_clone_for_free(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    async with http.post(mesh.url + CLONE, json=body(), headers=customer.headers) as response:
        assert response.status == 200 and response.headers["X-Credits-Charged"] == "0"
        await response.read()


async def test_mp3_and_flac_references_are_accepted(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    for fmt in ("mp3", "flac"):
        clone = body(ref_audio="data:audio/mpeg;base64," + reference(fmt=fmt), text="Hi.")
        async with http.post(mesh.url + CLONE, json=clone, headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            await response.read()


def ten_minutes() -> str:
    # Ten minutes of silence: FLAC packs it small enough to fit the test body limit.
    return base64.b64encode(encode_audio(b"\0\0" * 8000 * 600, 8000, "flac")[0]).decode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"ref_audio": base64.b64encode(b"this is not audio, only text").decode()},
            "not a readable audio file",
        ),
        ({"ref_audio": ""}, "'ref_audio' is empty"),
        ({"ref_audio": base64.b64encode(encode_audio(b"", 16000, "wav")[0]).decode()}, "contains no audio"),
        ({"ref_audio": "not base64 at all!"}, "not valid base64"),
        ({"ref_audio": ten_minutes()}, "longer than the limit of 60 seconds"),
        ({"text": ""}, "'text' must not be empty"),
        ({"text": "x" * 4097}, "the limit is 4096"),
        ({"ref_text": None}, "ref_text"),
        ({"language": "Klingon"}, "Unsupported language 'Klingon'. Supported languages: Auto, Chinese"),
        ({"stream": "yes"}, "stream"),
    ],
)
async def test_bad_input_is_a_free_400(
    mesh: Mesh, http: aiohttp.ClientSession, changes: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    async with http.post(mesh.url + CLONE, json=body(**changes), headers=customer.headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]
    assert await balance(mesh, customer.account_id) == 500


async def test_languages_are_published(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    async with http.get(mesh.url + "/v1/audio/clone/languages") as response:
        assert response.status == 200
        listing = await response.json()
    (model,) = listing["data"]
    assert model["id"] == "qwen3-tts-base" and model["sample_rate"] == RATE
    assert {"Auto", "English", "Chinese", "Japanese"} <= set(model["languages"])
    assert listing["default_language"] == "English"
