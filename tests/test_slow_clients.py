"""Slow clients cannot hold the edge: a connection gets ``http_header_timeout_seconds`` to
send its headers, a body must keep up ``http_body_min_rate`` after
``http_body_timeout_seconds`` (408), and while 200 slowloris connections trickle their
headers, normal requests are answered.

The edge runs with billing only (``tests.stack.offline_stack``) and small timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.stack import OfflineStack, offline_stack

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
#: Far above what a trickle sends, far below what loopback carries.
MIN_RATE = 100_000
HALF_OPEN = 200


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OfflineStack]:
    async with offline_stack(
        tmp_path_factory.mktemp("slow"),
        http_header_timeout_seconds=HEADER_TIMEOUT,
        http_body_timeout_seconds=BODY_TIMEOUT,
        http_body_min_rate=MIN_RATE,
    ) as running:
        yield running


def _address(stack: OfflineStack) -> tuple[str, int]:
    host, port = stack.url.removeprefix("http://").split(":")
    return host, int(port)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def _slowloris(stack: OfflineStack, stop: asyncio.Event) -> float:
    """One half-open connection: a request line, then a header one byte at a time, never
    finished. Returns how long the server kept it open."""
    reader, writer = await asyncio.open_connection(*_address(stack))
    opened = time.perf_counter()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nX-Slow: ")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while not stop.is_set():
                await asyncio.sleep(0.1)
                writer.write(b"a")
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(_closed(reader), HEADER_TIMEOUT + 10)
        assert answer == b""  # closed without an answer (there is no request to answer)
        return time.perf_counter() - opened
    finally:
        trickling.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await writer.wait_closed()


async def test_200_slowloris_connections_are_closed_and_normal_requests_answered(
    stack: OfflineStack,
) -> None:
    _, headers = await stack.customer()
    stop = asyncio.Event()
    attackers = [asyncio.create_task(_slowloris(stack, stop)) for _ in range(HALF_OPEN)]
    try:
        await asyncio.sleep(0.3)  # every connection is open and trickling
        assert not any(task.done() for task in attackers)
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.url + "/healthz") as response:
                assert response.status == 200
            async with http.get(stack.url + "/v1/account", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["balance"] == "100"
        kept_open = await asyncio.gather(*attackers)
    finally:
        stop.set()
        for task in attackers:
            task.cancel()
    print(f"{HALF_OPEN} half-open connections closed after {min(kept_open):.2f}-{max(kept_open):.2f} s")
    # The issue asks for this bound: each is closed once its header time is up (the timer
    # fires on aiohttp's keep-alive handle, within a second of it).
    assert HEADER_TIMEOUT - 0.1 <= min(kept_open) and max(kept_open) < HEADER_TIMEOUT + 2


async def test_an_idle_connection_is_closed_after_the_header_timeout(stack: OfflineStack) -> None:
    reader, writer = await asyncio.open_connection(*_address(stack))
    try:
        assert await asyncio.wait_for(_closed(reader), HEADER_TIMEOUT + 10) == b""
    finally:
        writer.close()


async def _slow_body(stack: OfflineStack, head: bytes, body_start: bytes) -> bytes:
    """Sends ``head`` and the start of a body, then one byte every 0.1 s; returns the answer
    the server sent before closing the connection."""
    reader, writer = await asyncio.open_connection(*_address(stack))
    writer.write(head + body_start)

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(_closed(reader), BODY_TIMEOUT + 10)
    finally:
        trickling.cancel()
        writer.close()


async def test_a_json_body_slower_than_the_minimum_rate_is_a_408(stack: OfflineStack) -> None:
    _, headers = await stack.customer()
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    )
    answer = await _slow_body(stack, head, b'{"prompt": "')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"Connection: close" in answer
    assert b"The request body did not arrive in time (at least 100000 bytes per second)." in answer


async def test_a_form_slower_than_the_minimum_rate_is_a_408(stack: OfflineStack) -> None:
    _, headers = await stack.customer()
    start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
    head = (
        b"POST /v1/images/segmentations HTTP/1.1\r\nHost: kiln\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        + b"\r\n"
    )
    answer = await _slow_body(stack, head, start)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"invalid_request_error" in answer


async def test_a_body_at_speed_is_read_as_usual(stack: OfflineStack) -> None:
    """The clock does not get in the way of a body that arrives: 2 MiB of JSON, read whole and
    answered for what it says (a prompt longer than the limit)."""
    _, headers = await stack.customer()
    body = {"prompt": "x" * (2 * 1024 * 1024)}
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url + "/v1/images/generations", json=body, headers=headers) as response,
    ):
        assert response.status == 400
        assert "at most 32768 characters" in (await response.json())["error"]["message"]
