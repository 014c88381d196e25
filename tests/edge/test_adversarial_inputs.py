"""Odd and hostile inputs get one definite answer each, never a 500.

An input that is merely odd but valid (a NUL, emoji, right-to-left marks, spaces,
a prompt of exactly the longest accepted length) generates and is charged the
image's price; one that breaks a documented rule (not JSON, not a JSON object,
wrong types, out of range, an unpaired surrogate, a blank prompt, a prompt or
negative prompt longer than ``max_prompt_chars``) is a 400 in the error envelope
and costs nothing.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import Customer, Mesh, balance, new_customer

GEN = "/v1/images/generations"

#: The price of one 256x256 z-image-turbo image at 1 step, from the documented
#: formula (services/billing/pricing.py; registry: base 0.25, per_megapixel 0.5,
#: reference_steps 8): (0.25 + 0.5 * 0.065536) * 1 / 8 = 0.035346 credits
#: = 3.5346 units, rounded up to 4 units (0.04 credits).
SMALL_IMAGE_UNITS = 4
SMALL_IMAGE = {"size": "256x256", "num_inference_steps": 1, "response_format": "url"}

RAW_BODIES = [
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep nesting
    b'{"prompt": "x", "seed": 1e400}',
    b'{"prompt": "x", "seed": 123456789012345678901234567890}',
    b'{"prompt": "x", "guidance_scale": NaN}',
    b'{"prompt": "x", "guidance_scale": -1}',
    b'{"prompt": "x", "guidance_scale": 1e308}',
    b'{"prompt": "\xff\xfe broken utf-8"}',
    b'{"prompt": "x", "n": 1.0}',
    b'{"prompt": "x", "n": true}',
    b'{"prompt": "x", "requests": []}',
    b'{"prompt": {"text": "x"}}',
    b'{"prompt": null}',
    b'{"prompt": "x", "image_size": "1024X1024"}',
    b'{"prompt": "x", "image_size": 1024}',
    b'{"prompt": "x", "model": ""}',
    b'{"prompt": "x", "model": "Z-IMAGE-TURBO-but-not"}',
    b'{"prompt": "\\ud800 lone surrogate"}',  # not Unicode text: no UTF-8 prompt exists for it
    b"\x00\x01\x02",
    b"null",
    b"true",
    b"12",
]


async def post_free_400(
    mesh: Mesh,
    http: aiohttp.ClientSession,
    customer: Customer,
    *,
    json: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Posts; checks the answer is a 400 in the envelope and charged nothing; returns the error."""
    before = await balance(mesh, customer.account_id)
    async with http.post(
        mesh.url + GEN, json=json, data=data, headers=customer.headers | (headers or {})
    ) as response:
        text = await response.text()
        assert response.status == 400, text[:300]
        payload = await response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, (
        payload
    )
    assert payload["error"]["param"] is None and payload["error"]["code"] is None
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == before
    return dict(payload["error"])


@pytest.mark.parametrize("raw", RAW_BODIES, ids=range(len(RAW_BODIES)))
async def test_odd_bodies_are_400s_in_the_envelope_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, raw: bytes
) -> None:
    customer = await new_customer(mesh, "5")
    await post_free_400(mesh, http, customer, data=raw, headers={"Content-Type": "application/json"})


async def generate_small_image(
    mesh: Mesh, http: aiohttp.ClientSession, prompt: str
) -> tuple[int, dict[str, Any]]:
    """One small image for a fresh customer: (units charged, the answer)."""
    customer = await new_customer(mesh, "5")
    before = await balance(mesh, customer.account_id)
    body = {"prompt": prompt, **SMALL_IMAGE}
    async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        answer = dict(await response.json())
    return before - await balance(mesh, customer.account_id), answer


@pytest.mark.parametrize(
    "prompt",
    ["\u0000nul inside", "emoji 🦊🔥", "RTL \u202e text", "  spaced  "],
    ids=["nul", "emoji", "rtl", "spaces"],
)
async def test_unusual_but_valid_prompts_generate_and_are_charged_the_image_price(
    mesh: Mesh, http: aiohttp.ClientSession, prompt: str
) -> None:
    charged, answer = await generate_small_image(mesh, http, prompt)
    assert len(answer["data"]) == 1 and answer["data"][0]["url"]
    assert charged == SMALL_IMAGE_UNITS


async def test_a_prompt_of_exactly_the_longest_length_generates_and_is_charged(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    charged, answer = await generate_small_image(mesh, http, "x" * mesh.settings.max_prompt_chars)
    assert len(answer["data"]) == 1
    assert charged == SMALL_IMAGE_UNITS


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
async def test_a_prompt_one_character_over_the_limit_is_a_free_400(
    mesh: Mesh, http: aiohttp.ClientSession, field: str
) -> None:
    limit = mesh.settings.max_prompt_chars
    body = {"prompt": "x", **SMALL_IMAGE, field: "x" * (limit + 1)}
    customer = await new_customer(mesh, "5")
    error = await post_free_400(mesh, http, customer, json=body)
    assert error["message"] == f"'{field}' is longer than {limit} characters"


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"], ids=["empty", "spaces", "newline-tab"])
async def test_a_blank_prompt_is_a_free_400(mesh: Mesh, http: aiohttp.ClientSession, prompt: str) -> None:
    customer = await new_customer(mesh, "5")
    error = await post_free_400(mesh, http, customer, json={"prompt": prompt, **SMALL_IMAGE})
    assert error["message"] == "'prompt' is required and must not be empty"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer a.b.c"},
        {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"X-API-Key": " "},
        {"X-API-Key": "sk-kiln-" + "\u00e9" * 10},
    ],
    ids=["bad-jwt", "long", "basic", "empty-bearer", "blank-key", "non-ascii"],
)
async def test_odd_credentials_are_401(
    mesh: Mesh, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    body = {"prompt": "x", "size": "256x256"}
    async with http.post(mesh.url + GEN, json=body, headers=headers) as response:
        assert response.status == 401, await response.text()
        assert (await response.json())["error"]["type"] == "authentication_error"
