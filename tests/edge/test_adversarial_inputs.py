"""Odd and hostile inputs get a clear answer in the envelope: never a 500, never a charge."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import Mesh, balance, new_customer

GEN = "/v1/images/generations"

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
    b"\x00\x01\x02",
    b"null",
    b"true",
    b"12",
]


@pytest.mark.parametrize("raw", RAW_BODIES, ids=range(len(RAW_BODIES)))
async def test_odd_bodies_are_clear_400s_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, raw: bytes
) -> None:
    customer = await new_customer(mesh, "5")
    headers = {**customer.headers, "Content-Type": "application/json"}
    async with http.post(mesh.url + GEN, data=raw, headers=headers) as response:
        text = await response.text()
        assert response.status == 400, text[:300]
        payload = await response.json()
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500


@pytest.mark.parametrize(
    "prompt",
    ["\u0000nul inside", "\ud800 lone surrogate", "emoji 🦊🔥", "RTL \u202e text", "  spaced  ", "x" * 4000],
    ids=["nul", "surrogate", "emoji", "rtl", "spaces", "longest"],
)
async def test_unusual_but_valid_prompts_generate(
    mesh: Mesh, http: aiohttp.ClientSession, prompt: str
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"prompt": prompt, "size": "256x256", "num_inference_steps": 1, "response_format": "url"}
    async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
        text = await response.text()
    assert response.status in (200, 400), text
    if response.status == 200:
        assert await balance(mesh, customer.account_id) < 500
    else:
        assert await balance(mesh, customer.account_id) == 500


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
