"""Rate limits at the edge (edge.ratelimit): billing and the edge with small limits; no capability
service runs, so a counted request that gets past Authorize ends in a 500 that costs nothing."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.stack import OfflineStack, books, offline_stack

GENERATE = "/v1/images/generations"
BODY = {"prompt": "a kiln", "size": "256x256"}
MESSAGE = "You have been ratelimited, this temporary restriction will be lifted in: {} seconds"


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, **overrides: Any) -> AsyncIterator[OfflineStack]:
    async with offline_stack(
        tmp_path, rate_limit_key_prefix=f"kiln-test-{secrets.token_hex(6)}", **overrides
    ) as running:
        yield running


def assert_limit_headers(response: aiohttp.ClientResponse, limit: int, remaining: int) -> None:
    assert response.headers["x-ratelimit-limit-requests"] == str(limit)
    assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.parametrize("storage", ["memory://", "redis://127.0.0.1:6379"])
async def test_over_the_limit_is_a_429_with_seed_003s_message_and_costs_nothing(
    tmp_path: Path, storage: str
) -> None:
    async with stack(tmp_path, rate_limit_rpm=2, rate_limit_storage=storage) as running:
        account_id, headers = await running.customer("10")
        async with aiohttp.ClientSession() as http:
            for remaining in (1, 0):  # counted; the missing image service makes them 500s, released
                async with http.post(running.url + GENERATE, json=BODY, headers=headers) as response:
                    assert response.status == 500, await response.text()
                    assert_limit_headers(response, 2, remaining)
            async with http.post(running.url + GENERATE, json=BODY, headers=headers) as response:
                assert response.status == 429
                error = (await response.json())["error"]
                seconds = int(response.headers["Retry-After"])
                assert 1 <= seconds <= 60
                assert 0 < int(response.headers["retry-after-ms"]) <= seconds * 1000
                assert error == {
                    "message": MESSAGE.format(seconds),
                    "type": "rate_limit_error",
                    "param": None,
                    "code": None,
                }
                assert_limit_headers(response, 2, 0)
            # A dry run is not counted (nor limited).
            async with http.post(
                running.url + GENERATE + "?dry_run=true", json=BODY, headers=headers
            ) as response:
                assert response.status == 200
                assert "x-ratelimit-limit-requests" not in response.headers
        state = await books(running.ledger, account_id)
        assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)  # nothing charged or held


async def test_a_queued_request_carries_the_headers_and_tasks_get_seed_003s_shape(tmp_path: Path) -> None:
    async with stack(tmp_path, rate_limit_rpm=1) as running:
        _, headers = await running.customer("10")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                running.url + GENERATE, json=BODY, headers=headers | {"Prefer": "respond-async"}
            ) as response:
                assert response.status == 202, await response.text()
                assert_limit_headers(response, 1, 0)
            task = {"model": "z-image-turbo", "input": BODY}
            async with http.post(running.url + "/v1/tasks", json=task, headers=headers) as response:
                assert response.status == 429
                payload = await response.json()
                seconds = int(response.headers["Retry-After"])
                assert payload["success"] is False and payload["code"] == 429
                assert payload["data"]["message"] == MESSAGE.format(seconds)
                assert "retry-after-ms" in response.headers
                assert_limit_headers(response, 1, 0)


async def test_unknown_keys_get_their_401_and_a_402_says_do_not_retry(tmp_path: Path) -> None:
    async with stack(tmp_path, rate_limit_rpm=1) as running:
        _, broke = await running.customer("0")
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # never limited: the limiter does not say whether a key exists
                async with http.post(
                    running.url + GENERATE, json=BODY, headers={"X-API-Key": "sk-kiln-unknown"}
                ) as response:
                    assert response.status == 401
                    assert "x-ratelimit-limit-requests" not in response.headers
            async with http.post(running.url + GENERATE, json=BODY, headers=broke) as response:
                assert response.status == 402
                assert response.headers["x-should-retry"] == "false"
                assert_limit_headers(response, 1, 0)


async def test_jobs_in_flight_over_the_limit_are_a_429_through_the_edge(tmp_path: Path) -> None:
    async with stack(tmp_path, rate_limit_max_concurrent=1) as running:
        account_id, headers = await running.customer("10")
        ledger = running.ledger
        held = await ledger.reserve(account_id, 10, "another request in flight", 60)
        async with aiohttp.ClientSession() as http:
            async with http.post(running.url + GENERATE, json=BODY, headers=headers) as response:
                assert response.status == 429
                assert (await response.json())["error"]["message"] == MESSAGE.format(1)
                assert response.headers["Retry-After"] == "1" and response.headers["retry-after-ms"] == "1000"
        await ledger.release(held.id)
        state = await books(ledger, account_id)
        assert (state.balance, state.held) == (1000, 0)


def test_every_paid_route_names_its_capability() -> None:
    from edge.ratelimit import ROUTE_CAPABILITIES
    from edge.routes import ROUTES

    paid = {route.path for route in ROUTES if route.paid} | {"/v1/tasks"}
    assert paid <= set(ROUTE_CAPABILITIES), paid - set(ROUTE_CAPABILITIES)
