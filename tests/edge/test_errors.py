"""Every error type reaches the client in the contract's envelope, and costs nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Mesh, balance, new_customer

GEN = "/v1/images/generations"


async def post(
    http: aiohttp.ClientSession, url: str, *, headers: dict[str, str], **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, headers=headers, **kw) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def assert_envelope(payload: dict[str, Any], error_type: str, message: str | None = None) -> None:
    assert set(payload) == {"error"}
    assert payload["error"]["type"] == error_type
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    if message is not None:
        assert payload["error"]["message"] == message


BAD_BODIES = [
    ({"prompt": "x", "model": "invalid-model"}, "Invalid model ID 'invalid-model'. Supported models: "),
    (
        {"prompt": "x", "model": "longcat-image-edit", "image_size": "1024x1792"},
        "The dimensions 1024x1792 exceed the maximum allowed for the longcat-image-edit model (1792x1024)",
    ),
    ({"prompt": "x", "image_size": "300x300"}, "Invalid image size '300x300'"),
    ({"prompt": "x", "image": "iVBORw0KGgo="}, "Use POST /v1/images/edits"),
    ({"prompt": "x", "input_images": ["a"]}, "Use POST /v1/images/edits"),
    ({"prompt": "x", "seed": "12"}, "Invalid value for 'seed'"),
    ({"prompt": "x", "seed": -1}, "'seed' must be between"),
    ({"prompt": 5}, "Invalid value for 'prompt'"),
    ({"prompt": "   "}, "'prompt' is required"),
    ({}, "Missing required parameter: 'prompt'"),
    ({"prompt": "x", "colour": "red"}, "Unrecognized request argument supplied: colour"),
    ({"prompt": "x", "num_inference_steps": 0}, "'num_inference_steps' must be between 1 and 50"),
    ({"prompt": "x", "num_inference_steps": 51}, "'num_inference_steps' must be between 1 and 50"),
    ({"prompt": "x", "batch_size": 5}, "The number of images must be between 1 and 4"),
    ({"prompt": "x", "n": 2, "batch_size": 3}, "'batch_size' and 'n' are the same parameter"),
    ({"prompt": "x", "guidance_scale": 1.0, "cfg": 2.0}, "'guidance_scale' and 'cfg'"),
    ({"prompt": "x", "response_format": "png"}, "Invalid value for 'response_format'"),
    ({"prompt": "x" * 5000}, "'prompt' is longer than 4000 characters"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES, ids=[m[:40] for _, m in BAD_BODIES])
async def test_bad_parameters_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
    assert status == 400
    assert_envelope(payload, "invalid_request_error")
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "The request body is not valid JSON."),
        (b"[1, 2]", "The request body must be a JSON object."),
        (b"", "The request body is empty; send a JSON object."),
        (b'"prompt"', "The request body must be a JSON object."),
    ],
)
async def test_malformed_json_is_400(
    mesh: Mesh, http: aiohttp.ClientSession, raw: bytes, message: str
) -> None:
    customer = await new_customer(mesh)
    headers = {**customer.headers, "Content-Type": "application/json"}
    status, payload = await post(http, mesh.url + GEN, data=raw, headers=headers)
    assert status == 400
    assert_envelope(payload, "invalid_request_error", message)


async def test_missing_wrong_and_revoked_keys_are_401(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "x", "size": "256x256"}
    message = "Authentication failed. Provide a valid API Key in the 'X-API-Key' header or log in."
    status, payload = await post(http, mesh.url + GEN, json=body, headers={})
    assert status == 401
    assert_envelope(payload, "authentication_error", message)
    for headers in ({"X-API-Key": "sk-kiln-nope"}, {"Authorization": "Bearer sk-kiln-nope"}):
        status, payload = await post(http, mesh.url + GEN, json=body, headers=headers)
        assert status == 401
        assert_envelope(payload, "authentication_error")
    customer = await new_customer(mesh)
    [key] = await mesh.ledger.list_api_keys(customer.account_id)  # type: ignore[attr-defined]
    await mesh.ledger.revoke_api_key(key.id if hasattr(key, "id") else key.key_id)  # type: ignore[attr-defined]
    status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
    assert status == 401
    assert_envelope(payload, "authentication_error")


async def test_expired_jwt_is_401(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    import time

    import jwt

    from tests.conftest import JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET

    customer = await new_customer(mesh)
    claims = {
        "sub": customer.account_id,
        "exp": int(time.time()) - 10,
        "aud": JWT_AUDIENCE,
        "iss": JWT_ISSUER,
    }
    token = jwt.encode(claims, JWT_SECRET, "HS256")
    async with http.get(mesh.url + "/v1/account", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 401
        assert_envelope(await response.json(), "authentication_error")


async def test_insufficient_credits_is_402_with_the_contract_message(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "0.5")
    body = {"prompt": "x", "size": "1024x1024"}  # (0.25 + 0.5 * 1.048576) = 0.774288 -> 0.78
    status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
    assert status == 402
    assert_envelope(
        payload, "insufficient_credits", "You do not have enough credits. Required: 0.78, Available: 0.5"
    )
    assert await balance(mesh, customer.account_id) == 50


async def test_premium_only_model_is_403_for_others(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "100")
    body = {"prompt": "x", "size": "256x256", "model": "z-image-turbo-premium"}
    status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
    assert status == 403
    assert_envelope(payload, "premium_required")
    assert await balance(mesh, customer.account_id) == 10000


async def test_body_over_the_limit_is_413(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh)
    raw = b'{"prompt": "' + b"x" * (mesh.settings.max_body_bytes + 10) + b'"}'
    headers = {**customer.headers, "Content-Type": "application/json"}
    status, payload = await post(http, mesh.url + GEN, data=raw, headers=headers)
    assert status == 413
    assert_envelope(payload, "invalid_request_error")


async def test_maintenance_mode_is_503_and_flips_without_restart(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "x", "size": "256x256"}
    await mesh.ledger.set_maintenance(True)  # type: ignore[attr-defined]
    try:
        for _ in range(50):  # billing re-reads the switch at least once a second
            status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503
        assert_envelope(payload, "maintenance_mode", "We're in maintenance mode now. Please try again later")
    finally:
        await mesh.ledger.set_maintenance(False)  # type: ignore[attr-defined]
    for _ in range(50):
        status, payload = await post(http, mesh.url + GEN, json=body, headers=customer.headers)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200


async def test_a_failed_generation_is_500_and_not_charged(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    """image_gen unreachable: processing_error, and the hold is released."""
    from edge.app import create_app

    settings = mesh.settings.with_addresses(image_gen="127.0.0.1:1")
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        customer = await new_customer(mesh, "5")
        status, payload = await post(
            http, url + GEN, json={"prompt": "x", "size": "256x256"}, headers=customer.headers
        )
        assert status == 500
        assert_envelope(payload, "processing_error")
        account = await mesh.ledger.get_account(customer.account_id)  # type: ignore[attr-defined]
        assert (account.balance, account.held) == (500, 0)
        async with http.get(url + "/readyz") as response:
            assert response.status == 503
    finally:
        await runner.cleanup()


async def test_unknown_routes_and_methods_use_the_envelope(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    async with http.get(mesh.url + "/v1/nope") as response:
        assert response.status == 404
        assert_envelope(await response.json(), "not_found_error")
    async with http.get(mesh.url + GEN) as response:
        assert response.status == 405
        assert_envelope(await response.json(), "invalid_request_error")
