"""POST /v1/images/upscale through the edge."""

from __future__ import annotations

import base64
import io
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.conftest import Mesh, balance, new_customer
from tests.edge.images_util import b64, png_bytes

UPSCALE = "/v1/images/upscale"


async def upscale(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(mesh.url + UPSCALE, json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


@pytest.mark.parametrize(
    ("method", "scale", "size"),
    [
        ("lanczos", 3, (192, 144)),
        ("realesrgan_4x", None, (256, 192)),
        ("realesrgan_2x", None, (128, 96)),
        ("swin2sr", 2, (128, 96)),
    ],
)
async def test_each_method_scales_the_image(
    mesh: Mesh, http: aiohttp.ClientSession, method: str, scale: int | None, size: tuple[int, int]
) -> None:
    customer = await new_customer(mesh, "5")
    body: dict[str, Any] = {"image": b64(png_bytes(64, 48)), "method": method}
    if scale is not None:
        body["scale"] = scale
    status, payload, headers = await upscale(mesh, http, body, customer.headers)
    assert status == 200, payload
    [item] = payload["data"]
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.size == size
    assert item["url"].startswith(mesh.url + "/v1/media/")
    assert headers["X-Upscale-Backend"]
    assert set(payload["timing"]) == {"queue_ms", "inference_ms", "encode_ms", "store_ms", "total_ms"}
    charged = int(Decimal(headers["X-Credits-Charged"]) * 100)
    assert charged > 0 and await balance(mesh, customer.account_id) == 500 - charged


async def test_price_follows_the_method_and_output_pixels(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    body = {"image": f"data:image/png;base64,{b64(png_bytes(100, 100))}", "method": "realesrgan_4x"}
    status, payload, headers = await upscale(mesh, http, body, customer.headers)
    assert status == 200, payload
    # (0.1 + 0.2 x 0.16 MP) = 0.132 -> 0.14 credits
    assert headers["X-Credits-Charged"] == "0.14"


BAD = [
    ({"image": "%%%", "method": "lanczos"}, "'image' is not valid base64"),
    ({"image": b64(b"not an image"), "method": "lanczos"}, "not a supported image"),
    ({"image": b64(png_bytes(1, 100000)), "method": "realesrgan_4x"}, "exceeds the maximum allowed"),
    ({"image": b64(png_bytes(32, 32)), "method": "waifu2x"}, "Invalid upscaling method 'waifu2x'"),
    ({"image": b64(png_bytes(32, 32)), "method": "realesrgan_4x", "scale": 2}, "upscales by 4 only"),
    ({"image": b64(png_bytes(32, 32)), "method": "lanczos", "scale": 9}, "upscales by 2 to 8"),
    (
        {"image": b64(png_bytes(32, 32)), "method": "swin2sr", "face_enhance": True},
        "'face_enhance' needs a face restoration model",
    ),
    ({"image": b64(png_bytes(32, 32))}, "Missing required parameter: 'method'"),
    ({"image": b64(png_bytes(32, 32)), "method": "lanczos", "scale": "2"}, "Invalid value for 'scale'"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:30] for _, m in BAD])
async def test_bad_upscales_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    status, payload, _ = await upscale(mesh, http, body, customer.headers)
    assert status == 400, payload
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500
