"""The billed flow through the real mesh: trace ids select nothing, Idempotency-Key replays,
and streams that are paid for before they end."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest

from services.billing.store import Database
from tests.conftest import Mesh, balance, new_customer
from tests.edge.images_util import png_bytes
from tests.stack import settled_books, wait_for_hold

GEN = "/v1/images/generations"
SPEECH = "/v1/audio/speech"
#: z-image-turbo, 256x256, 8 steps: (0.25 + 0.5 * 0.065536) * 8 / 8 = 0.282768 -> 0.29 credits.
IMAGE_256 = 29
#: Piper voices: a flat 0.1 credit per request.
SPEECH_PRICE = 10
LONG_TEXT = " ".join(["Kiln speaks this sentence slowly, one clause after another."] * 12)


async def generate(
    http: aiohttp.ClientSession, mesh: Mesh, headers: dict[str, str], body: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(mesh.url + GEN, json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def reservations(mesh: Mesh, account_id: str) -> list[tuple[str, int]]:
    rows = await mesh.ledger.db.run(
        lambda tx: tx.all(
            "SELECT state, charged FROM reservations WHERE account_id = ? ORDER BY created_at_ms, id",
            (account_id,),
        ),
        write=False,
    )
    return [(str(state), int(charged)) for state, charged in rows]


# --- X-Request-ID is a trace id only ---


async def test_the_same_x_request_id_on_three_paid_requests_charges_three_times(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"X-Request-ID": "replayed-trace-id"}
    images = []
    for seed in (1, 2, 3):
        body = {"prompt": "a kiln", "size": "256x256", "seed": seed, "response_format": "b64_json"}
        status, answer_headers, raw = await generate(http, mesh, headers, body)
        assert status == 200, raw
        assert answer_headers["X-Request-ID"] == "replayed-trace-id"
        assert answer_headers["X-Credits-Charged"] == "0.29"
        images.append(raw)
    assert len(set(images)) == 3
    assert await balance(mesh, customer.account_id) == 1000 - 3 * IMAGE_256
    assert await reservations(mesh, customer.account_id) == [("committed", IMAGE_256)] * 3


# --- Idempotency-Key ---


async def test_an_idempotency_key_replays_the_first_answer_once_charged(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "order-7f3a"}
    body = {"prompt": "a kiln at night", "size": "256x256", "response_format": "url"}
    first = await generate(http, mesh, headers, body)
    again = await generate(http, mesh, headers | {"X-Request-ID": "a-retry"}, body)
    assert first[0] == again[0] == 200
    assert again[2] == first[2]  # the same body: the same media URLs and seed
    assert again[1]["X-Credits-Charged"] == first[1]["X-Credits-Charged"] == "0.29"
    assert again[1]["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first[1]
    assert again[1]["X-Request-ID"] == "a-retry"
    assert await balance(mesh, customer.account_id) == 1000 - IMAGE_256
    assert await reservations(mesh, customer.account_id) == [("committed", IMAGE_256)]  # ran once


async def test_the_stored_answer_survives_a_restart_of_billing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "kept-on-disk"}
    body = {"prompt": "a pot", "size": "256x256"}
    status, _, raw = await generate(http, mesh, headers, body)
    assert status == 200
    reopened = await Database.open(mesh.settings.resolved_database_url)  # what a restarted billing reads
    try:
        row = await reopened.run(
            lambda tx: tx.one(
                "SELECT response_status, response_body, expires_at_ms - created_at_ms FROM idempotency_keys"
                " WHERE account_id = ? AND idem_key = ?",
                (customer.account_id, "kept-on-disk"),
            ),
            write=False,
        )
    finally:
        await reopened.close()
    assert row is not None and row[0] == 200 and bytes(row[1]) == raw and row[2] == 24 * 3600 * 1000


async def test_a_large_answer_is_replayed_from_the_media_store(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "big-answer"}
    body = {"prompt": "noise", "size": "512x512", "response_format": "b64_json", "seed": 3}
    first = await generate(http, mesh, headers, body)
    assert first[0] == 200 and len(first[2]) > 256 * 1024
    again = await generate(http, mesh, headers, body)
    assert again[0] == 200 and again[2] == first[2] and again[1]["Idempotent-Replayed"] == "true"
    assert len(await reservations(mesh, customer.account_id)) == 1


async def test_the_same_key_with_another_body_is_a_400_naming_the_key(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "key-for-a-fox"}
    assert (await generate(http, mesh, headers, {"prompt": "a fox", "size": "256x256"}))[0] == 200
    status, _, raw = await generate(http, mesh, headers, {"prompt": "a wolf", "size": "256x256"})
    assert status == 400
    error = (json.loads(raw))["error"]
    assert error["type"] == "invalid_request_error" and "'key-for-a-fox'" in error["message"]
    assert await balance(mesh, customer.account_id) == 1000 - IMAGE_256


async def test_a_concurrent_duplicate_is_a_409_while_the_first_runs(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "twice-at-once"}
    body = {"prompt": "a slow kiln", "size": "512x512", "n": 2}
    first = asyncio.create_task(generate(http, mesh, headers, body))
    await wait_for_hold(mesh.ledger, customer.account_id)
    status, _, raw = await generate(http, mesh, headers, body)
    assert status == 409, raw
    assert b'"type":"invalid_request_error"' in raw and b"in progress" in raw
    assert (await first)[0] == 200
    assert len(await reservations(mesh, customer.account_id)) == 1


async def test_a_multipart_retry_with_a_new_boundary_is_the_same_request(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "cutout-1"}
    answers = []
    for prompt in ("the square", "the square", "the circle"):
        form = aiohttp.FormData()  # a new random boundary each time
        form.add_field("file", png_bytes(64, 64), filename="in.png", content_type="image/png")
        form.add_field("prompt", prompt)
        async with http.post(
            mesh.url + "/v1/images/remove-background", data=form, headers=headers
        ) as response:
            answers.append((response.status, await response.read()))
    assert answers[0][0] == answers[1][0] == 200 and answers[0][1] == answers[1][1]
    assert answers[2][0] == 400  # another prompt under the same key
    assert await balance(mesh, customer.account_id) == 1000 - 25


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\tinside"])
async def test_a_malformed_idempotency_key_is_a_400_that_costs_nothing(
    mesh: Mesh, http: aiohttp.ClientSession, key: str
) -> None:
    customer = await new_customer(mesh, "10")
    status, _, raw = await generate(
        http, mesh, customer.headers | {"Idempotency-Key": key}, {"prompt": "x", "size": "256x256"}
    )
    assert status == 400 and b"Idempotency-Key" in raw and len(raw) < 400
    assert await balance(mesh, customer.account_id) == 1000


async def test_a_streamed_answer_is_not_replayed(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "speech-once"}
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "wav"}
    async with http.post(mesh.url + SPEECH, json=body, headers=headers) as response:
        assert response.status == 200
        await response.read()
    async with http.post(mesh.url + SPEECH, json=body, headers=headers) as response:
        assert response.status == 409
        assert "not replayed" in (await response.json())["error"]["message"]
    assert await balance(mesh, customer.account_id) == 1000 - SPEECH_PRICE


# --- streams are paid for before they end ---


async def test_a_streamed_speech_read_to_the_end_is_charged(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm"}
    async with http.post(mesh.url + SPEECH, json=body, headers=customer.headers) as response:
        assert response.status == 200 and response.headers["X-Credits-Charged"] == "0.1"
        pcm = await response.read()
    assert len(pcm) > 22050 * 2  # seconds of audio
    assert await reservations(mesh, customer.account_id) == [("committed", SPEECH_PRICE)]
    assert await balance(mesh, customer.account_id) == 1000 - SPEECH_PRICE


async def _raw_post(mesh: Mesh, path: str, body: bytes, headers: dict[str, str]) -> tuple[Any, Any]:
    host, port = mesh.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def test_a_client_gone_before_any_output_byte_is_not_charged(mesh: Mesh) -> None:
    customer = await new_customer(mesh, "10")
    body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "wav"}
    _, writer = await _raw_post(mesh, SPEECH, json.dumps(body).encode(), customer.headers)
    writer.close()  # gone before reading a byte
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await asyncio.sleep(0.2)
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)
    assert [s for s, _ in await reservations(mesh, customer.account_id)] in ([], ["released"])


async def test_a_client_gone_in_the_middle_of_a_stream_is_not_charged(mesh: Mesh) -> None:
    customer = await new_customer(mesh, "10")
    body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm"}
    reader, writer = await _raw_post(mesh, SPEECH, json.dumps(body).encode(), customer.headers)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(1024)  # some audio, then gone
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)
    assert await reservations(mesh, customer.account_id) == [("released", 0)]


async def test_a_streamed_chat_is_committed_before_done(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    body = {
        "model": "Qwen/Qwen3.5-4B",  # the default chat model, served first
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 4,
    }
    async with http.post(mesh.url + "/v1/chat/completions", json=body, headers=customer.headers) as response:
        assert response.status == 200
        text = (await response.read()).decode()
    assert text.endswith("data: [DONE]\n\n")
    assert await reservations(mesh, customer.account_id) == [("committed", 0)]


async def test_the_batch_charges_only_what_billing_prices_for_the_entries_made(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    body = {
        "requests": [
            {"prompt": "one", "size": "256x256"},
            {"prompt": "two", "size": "512x512", "n": 2},
        ]
    }
    async with http.post(mesh.url + GEN + "/batch", json=body, headers=customer.headers) as response:
        assert response.status == 200
        payload = await response.json()
        charged = response.headers["X-Credits-Charged"]
    # 512x512: (0.25 + 0.5 * 0.262144) = 0.381072 -> 0.39 credits an image, 2 of them
    assert [len(entry["data"]) for entry in payload["data"]] == [1, 2]
    assert charged == "1.07"
    assert await balance(mesh, customer.account_id) == 1000 - (IMAGE_256 + 2 * 39)
