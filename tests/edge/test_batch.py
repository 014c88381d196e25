"""POST /v1/images/generations/batch: one entry per request, the sum reserved once."""

from __future__ import annotations

import aiohttp

from tests.conftest import Mesh, balance, new_customer

BATCH = "/v1/images/generations/batch"


async def test_batch_returns_one_entry_per_request_and_charges_the_sum(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    body = {
        "requests": [
            {"model": "z-image-turbo", "prompt": "A red sports car", "image_size": "256x256"},
            {"prompt": "A blue ocean wave", "image_size": "512x512", "num_inference_steps": 4},
        ]
    }
    async with http.post(mesh.url + BATCH, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        payload = await response.json()
        charged = response.headers["X-Credits-Charged"]
    assert len(payload["data"]) == 2
    for entry in payload["data"]:
        assert isinstance(entry["created"], int)
        [item] = entry["data"]
        assert item["url"] and item["b64_json"]
    # 0.282768 -> 0.29; (0.25 + 0.5 * 0.262144) * 4 / 8 = 0.190536 -> 0.20
    assert charged == "0.49"
    assert 1000 - await balance(mesh, customer.account_id) == 49
    ledger = await mesh.ledger.ledger_entries(customer.account_id)  # type: ignore[attr-defined]
    holds = [e for e in ledger if e.kind == "hold"]
    assert len(holds) == 1


async def test_batch_limits_and_item_errors_are_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    cases = [
        ({"requests": [{"prompt": "x"}] * 6}, "'requests' must hold between 1 and 5 requests"),
        ({"requests": []}, "'requests' must hold between 1 and 5 requests"),
        (
            {"requests": [{"prompt": "x"}, {"prompt": "y", "image_size": "9x9"}]},
            "requests[1]: Invalid image size",
        ),
        ({"requests": [{"prompt": "x"}, {"prompt": 3}]}, "Invalid value for 'requests[1].prompt'"),
        ({}, "Missing required parameter: 'requests'"),
    ]
    for body, message in cases:
        async with http.post(mesh.url + BATCH, json=body, headers=customer.headers) as response:
            assert response.status == 400
            payload = await response.json()
        assert payload["error"]["type"] == "invalid_request_error"
        assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 1000
