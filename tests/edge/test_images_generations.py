"""POST /v1/images/generations through the real edge, billing and image_gen."""

from __future__ import annotations

import base64
import io

import aiohttp
from PIL import Image

from tests.conftest import Mesh, balance, new_customer

GEN = "/v1/images/generations"


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


async def test_generation_returns_url_and_b64_and_charges_the_quote(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    before = await balance(mesh, customer.account_id)
    body = {"prompt": "a red fox in snow", "image_size": "256x256", "seed": 7}
    async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        payload = await response.json()
        charged = response.headers["X-Credits-Charged"]
    assert isinstance(payload["created"], int)
    [item] = payload["data"]
    assert item["revised_prompt"] is None
    image_bytes = base64.b64decode(item["b64_json"])
    assert png_size(image_bytes) == (256, 256)
    # (0.25 + 0.5 * 0.065536) * 8 / 8 = 0.282768 -> 0.29 credits, rounded up
    assert charged == "0.29"
    assert before - await balance(mesh, customer.account_id) == 29
    async with http.get(item["url"]) as media:
        assert media.status == 200
        assert media.headers["Content-Type"] == "image/png"
        assert await media.read() == image_bytes


async def test_same_seed_gives_identical_bytes_through_the_edge(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "a lighthouse", "size": "256x256", "seed": 1234, "response_format": "b64_json"}
    images = []
    for _ in range(2):
        async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 200
            images.append((await response.json())["data"][0]["b64_json"])
    assert images[0] == images[1]


async def test_response_format_selects_url_or_b64(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh)
    for fmt, present, absent in (("url", "url", "b64_json"), ("b64_json", "b64_json", "url")):
        body = {"prompt": "a cat", "size": "256x256", "response_format": fmt}
        async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 200
            [item] = (await response.json())["data"]
        assert present in item and absent not in item


async def test_openai_aliases_and_n_give_several_images(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh)
    for alias in ("dall-e-3", "dall-e-2", "flux-schnell", "qwen/qwen-image", "pixart-sigma"):
        body = {"model": alias, "prompt": "a boat", "size": "256x256", "n": 2, "num_inference_steps": 2}
        async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            assert len((await response.json())["data"]) == 2


async def test_bearer_api_key_and_hs256_jwt_are_accepted(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    import time

    import jwt

    from tests.conftest import JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET

    customer = await new_customer(mesh)
    claims = {
        "sub": customer.account_id,
        "exp": int(time.time()) + 60,
        "aud": JWT_AUDIENCE,
        "iss": JWT_ISSUER,
    }
    token = jwt.encode(claims, JWT_SECRET, "HS256")
    for credential in (customer.key, token):
        headers = {"Authorization": f"Bearer {credential}"}
        async with http.get(mesh.url + "/v1/account", headers=headers) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["id"] == customer.account_id


async def test_premium_accounts_pay_nothing(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    body = {"prompt": "a castle", "size": "512x512"}
    async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["X-Credits-Charged"] == "0"
    assert await balance(mesh, customer.account_id) == 0
