"""/v1/music/generate, /cover and /repaint through the edge (tiny ACE-Step 1.5): formats,
durations, seeds, the JSON switch, multipart and base64 sources, free 400s."""

from __future__ import annotations

import base64
import io
import json
import wave
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from tests.conftest import Customer, Mesh, balance, new_customer

RATE = 48000
#: Samples per latent frame of ACE-Step 1.5 (25 frames a second at 48 kHz).
HOP = 1920
GENERATE = "/v1/music/generate"


def decoded(data: bytes) -> tuple[int, int, float]:
    """(rate, channels, seconds) as PyAV decodes the file."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, stream.codec_context.channels, samples / stream.rate


def wav_samples(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (RATE, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)


async def post(
    http: aiohttp.ClientSession, mesh: Mesh, customer: Customer, path: str, **kwargs: Any
) -> bytes:
    async with http.post(mesh.url + path, headers=customer.headers, **kwargs) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def song(
    http: aiohttp.ClientSession, mesh: Mesh, customer: Customer, seconds: float, seed: int, fmt: str = "wav"
) -> bytes:
    body = {
        "prompt": "calm piano",
        "duration": seconds,
        "seed": seed,
        "instrumental": True,
        "audio_format": fmt,
    }
    return await post(http, mesh, customer, GENERATE, json=body)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac"])
async def test_each_format_decodes_to_the_requested_duration(
    mesh: Mesh, http: aiohttp.ClientSession, fmt: str
) -> None:
    customer = await new_customer(mesh, "5")
    body = {
        "prompt": "Energetic electronic dance music with heavy bass",
        "lyrics": "Pumping beats and flashing lights",
        "bpm": 128,
        "key_scale": "C Major",
        "time_signature": "4/4",
        "vocal_language": "en",
        "duration": 1.5,
        "instrumental": False,
        "audio_format": fmt,
        "seed": 5,
    }
    async with http.post(mesh.url + GENERATE, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Disposition"] == f'attachment; filename="generated_music.{fmt}"'
        assert response.headers["X-Seed"] == "5" and response.headers["X-Credits-Charged"] == "1"
        data = await response.read()
    rate, channels, seconds = decoded(data)
    assert channels == 2 and rate in (RATE, 44100)
    # Lossy encoders add priming/padding of up to a frame or two; wav and flac are exact.
    tolerance = HOP / RATE if fmt in ("wav", "flac") else 0.1
    assert seconds == pytest.approx(1.5, abs=tolerance)
    assert await balance(mesh, customer.account_id) == 400


async def test_same_seed_same_audio_and_the_json_switch(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    first = await song(http, mesh, customer, 1.0, seed=42)
    assert await song(http, mesh, customer, 1.0, seed=42) == first
    assert await song(http, mesh, customer, 1.0, seed=43) != first
    body = {"prompt": "calm piano", "duration": 1.0, "seed": 42, "instrumental": True}
    async with http.post(
        mesh.url + GENERATE + "?response_format=json", json=body, headers=customer.headers
    ) as response:
        assert response.status == 200
        described = await response.json()
    assert described["seed"] == 42 and described["model"] == "ace-step-v1.5"
    assert (described["sample_rate"], described["channels"], described["duration"]) == (RATE, 2, 1.0)
    assert described["content_type"] == "audio/wav" and described["credits_charged"] == "1"
    assert {"queue_ms", "inference_ms", "encode_ms", "store_ms", "total_ms"} <= set(described["timing"])
    async with http.get(described["url"]) as stored:
        assert stored.status == 200 and await stored.read() == first
    assert await balance(mesh, customer.account_id) == 100


async def test_premium_generates_for_free(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    assert len(await song(http, mesh, customer, 1.0, seed=1)) > 44


async def test_cover_keeps_the_duration_from_a_multipart_or_base64_source(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    # (The test mesh takes bodies of 256 KiB at most: a second of 48 kHz stereo WAV fits a form.)
    source = await song(http, mesh, customer, 1.2, seed=7)
    form = aiohttp.FormData()
    form.add_field("audio", source, filename="song.wav", content_type="audio/wav")
    form.add_field("prompt", "lo-fi hip hop")
    form.add_field("audio_cover_strength", "0.5")
    form.add_field("seed", "3")
    covered = await post(http, mesh, customer, "/v1/music/cover", data=form)
    assert len(wav_samples(covered)) == len(wav_samples(source))
    mp3 = await song(http, mesh, customer, 1.2, seed=7, fmt="mp3")
    body = {"audio": base64.b64encode(mp3).decode(), "prompt": "jazz", "audio_format": "flac", "seed": 3}
    flac = await post(http, mesh, customer, "/v1/music/cover", json=body)
    assert decoded(flac)[2] == pytest.approx(decoded(mp3)[2], abs=HOP / RATE)
    assert await balance(mesh, customer.account_id) == 100


async def test_repaint_keeps_the_outside_and_changes_the_inside(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    source = await song(http, mesh, customer, 1.0, seed=9)
    form = aiohttp.FormData()
    form.add_field("audio", source, filename="song.wav", content_type="audio/wav")
    for name, value in {"prompt": "drums", "start": "0.25", "end": "0.6", "seed": "4"}.items():
        form.add_field(name, value)
    repainted = wav_samples(await post(http, mesh, customer, "/v1/music/repaint", data=form))
    original = wav_samples(source)
    start, end = int(0.25 * RATE), int(0.6 * RATE)
    assert repainted.shape == original.shape
    assert np.array_equal(repainted[:start], original[:start])
    assert np.array_equal(repainted[end:], original[end:])
    assert not np.array_equal(repainted[start:end], original[start:end])


def wav_b64(seconds: float) -> str:
    pcm = (np.zeros(int(seconds * 8000))).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(pcm)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("path", "changes", "message"),
    [
        (GENERATE, {"duration": 601}, "'duration'"),
        (GENERATE, {"bpm": 0}, "'bpm'"),
        (GENERATE, {"key_scale": "H Major"}, "key_scale 'H Major'"),
        (GENERATE, {"time_signature": "5/0"}, "time_signature '5/0'"),
        (GENERATE, {"audio_format": "ogg"}, "'audio_format'"),
        (GENERATE, {"lyrics": "la la", "instrumental": True}, "instrumental"),
        ("/v1/music/cover", {"audio": base64.b64encode(b"no music in here").decode()}, "'source_audio'"),
        ("/v1/music/cover", {}, "Missing required parameter: 'audio'"),
        ("/v1/music/repaint", {"audio": wav_b64(2.0), "start": 1.0, "end": 1.0}, "'end'"),
        ("/v1/music/repaint", {"audio": wav_b64(2.0), "start": 1.5, "end": 0.5}, "'end'"),
        (
            "/v1/music/repaint",
            {"audio": wav_b64(2.0), "start": 1.0, "end": 3.0},
            "beyond the end of the song",
        ),
        ("/v1/music/repaint", {"audio": wav_b64(2.0), "start": 2.5}, "beyond the end of the song"),
    ],
)
async def test_bad_input_is_a_free_400(
    mesh: Mesh, http: aiohttp.ClientSession, path: str, changes: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"prompt": "a song", "duration": 1.0} if path == GENERATE else {"prompt": "a song"}
    body.update(changes)
    async with http.post(mesh.url + path, json=body, headers=customer.headers) as response:
        assert response.status == 400, await response.text()
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    assert await balance(mesh, customer.account_id) == 500


async def test_unknown_response_format_is_a_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    body = {"prompt": "a song", "duration": 1.0}
    async with http.post(
        mesh.url + GENERATE + "?response_format=xml", json=body, headers=customer.headers
    ) as response:
        assert response.status == 400
        assert "response_format" in (await response.json())["error"]["message"]


async def test_progress_streams_as_server_sent_events(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    headers = {**customer.headers, "Accept": "text/event-stream"}
    body = {"prompt": "calm piano", "duration": 1.0, "seed": 42, "num_inference_steps": 3}
    async with http.post(mesh.url + GENERATE, json=body, headers=headers) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        blocks = (await response.text()).strip().split("\n\n")
    events = [dict(line.split(": ", 1) for line in block.splitlines()) for block in blocks]
    assert [e["event"] for e in events] == ["progress", "progress", "progress", "result"]
    assert [json.loads(e["data"])["step"] for e in events[:3]] == [1, 2, 3]
    result = json.loads(events[-1]["data"])
    assert result["seed"] == 42 and result["duration"] == 1.0 and result["credits_charged"] == "1"
    async with http.get(result["url"]) as stored:
        assert decoded(await stored.read())[1:] == (2, pytest.approx(1.0, abs=HOP / RATE))
    assert await balance(mesh, customer.account_id) == 400


async def test_a_7_1_flac_source_is_covered_and_the_mesh_keeps_answering(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    """An 8-channel FLAC once crashed every service of the process (a PyAV decode bug)."""
    import io

    import numpy as np
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((48000, 8), dtype=np.float32), 48000, format="FLAC")
    customer = await new_customer(mesh, "5")
    form = aiohttp.FormData()
    form.add_field("audio", buf.getvalue(), filename="surround.flac", content_type="audio/flac")
    form.add_field("prompt", "ambient")
    form.add_field("seed", "1")
    covered = await post(http, mesh, customer, "/v1/music/cover", data=form)
    assert len(wav_samples(covered)) > 0
    async with http.get(mesh.url + "/healthz") as health:
        assert health.status == 200
    assert await balance(mesh, customer.account_id) == 400


async def test_a_huge_key_scale_is_a_short_400_that_costs_nothing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"prompt": "calm piano", "duration": 1.0, "key_scale": "C" + " " * 20_000 + "x"}
    async with http.post(mesh.url + GENERATE, json=body, headers=customer.headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "key_scale" in error["message"]
    assert len(error["message"]) < 300
    assert await balance(mesh, customer.account_id) == 500
