"""POST /v1/images/edits: the contract's JSON body, OpenAI's multipart form, and every error."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mesh, balance, new_customer
from tests.edge.images_util import b64, bomb_png, open_image, png_bytes

EDITS = "/v1/images/edits"
KLEIN = "black-forest-labs/FLUX.2-klein-4B"
KLEIN_BASE = "black-forest-labs/FLUX.2-klein-base-4B"


async def edit(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(mesh.url + EDITS, json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_an_edit_of_one_image_keeps_its_size_and_costs_half_a_credit(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"prompt": "make it green", "input_images": [b64(png_bytes(320, 192))], "seed": 3}
    status, payload, headers = await edit(mesh, http, body, customer.headers)
    assert status == 200, payload
    [item] = payload["data"]
    assert open_image(base64.b64decode(item["b64_json"])).size == (320, 192)
    assert headers["X-Credits-Charged"] == "0.5"
    assert await balance(mesh, customer.account_id) == 450
    assert set(payload["timing"]) == {"queue_ms", "inference_ms", "encode_ms", "store_ms", "total_ms"}


async def test_four_inputs_data_urls_explicit_size_and_match_image_size(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    inputs = [f"data:image/png;base64,{b64(png_bytes(256, 256, (i * 60, 20, 20)))}" for i in range(4)]
    body = {
        "prompt": "combine",
        "input_images": inputs,
        "width": 384,
        "height": 256,
        "response_format": "b64_json",
    }
    status, payload, _ = await edit(mesh, http, body, customer.headers)
    assert status == 200, payload
    assert open_image(base64.b64decode(payload["data"][0]["b64_json"])).size == (384, 256)
    body |= {"match_image_size": 1}
    status, payload, _ = await edit(mesh, http, body, customer.headers)
    assert status == 200, payload
    assert open_image(base64.b64decode(payload["data"][0]["b64_json"])).size == (256, 256)


async def test_distilled_and_base_models_use_their_default_steps(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    for model, steps in ((KLEIN, "4"), (KLEIN_BASE, "50")):
        body = {
            "model": model,
            "prompt": "a hat",
            "input_images": [b64(png_bytes(128, 128))],
            "embed_exif_metadata": True,
            "response_format": "b64_json",
        }
        status, payload, _ = await edit(mesh, http, body, customer.headers)
        assert status == 200, payload
        text = open_image(base64.b64decode(payload["data"][0]["b64_json"])).text  # type: ignore[attr-defined]
        assert text["steps"] == steps and text["model"] == model


async def test_the_openai_sdk_edits_with_one_and_several_files(mesh: Mesh) -> None:
    from openai import AsyncOpenAI

    customer = await new_customer(mesh, "5")
    client = AsyncOpenAI(api_key=customer.key, base_url=mesh.url + "/v1", max_retries=0)
    one = await client.images.edit(
        image=("cat.png", png_bytes(256, 256), "image/png"),
        prompt="add a hat",
        size="256x256",
        response_format="b64_json",
    )
    assert one.data and open_image(base64.b64decode(one.data[0].b64_json or "")).size == (256, 256)
    several = await client.images.edit(
        image=[
            ("a.png", png_bytes(256, 256), "image/png"),
            ("b.png", png_bytes(256, 256, (0, 0, 200)), "image/png"),
        ],
        prompt="blend them",
        n=2,
        model=KLEIN,
    )
    assert len(several.data or []) == 2 and all(d.url for d in several.data or [])
    await client.close()
    assert await balance(mesh, customer.account_id) == 500 - 50 - 100


BAD_EDITS = [
    ({"input_images": [b64(png_bytes(64, 64))] * 5}, "Too many input images: 5"),
    ({"input_images": []}, "at least one input image"),
    ({"input_images": ["not base64 at all!"]}, "is not valid base64"),
    ({"input_images": [b64(b"GIF89a not really")]}, "not a supported image"),
    ({"input_images": [b64(png_bytes(1100, 1000))]}, "Input image 1: The image is too large: 1100x1000"),
    ({"input_images": [b64(bomb_png())]}, "Input image 1: The image is too large"),
    ({"input_images": [b64(png_bytes(64, 64))], "aspect_ratio": "5:4"}, "Invalid aspect_ratio '5:4'"),
    (
        {"input_images": [b64(png_bytes(64, 64))], "resolution": "4K"},
        "The resolution 4K at 1:1 (4096x4096) exceeds",
    ),
    ({"input_images": [b64(png_bytes(64, 64))], "width": 100, "height": 100}, "must be multiples of 16"),
    ({"input_images": [b64(png_bytes(64, 64))], "width": 256}, "Give both 'width' and 'height'"),
    (
        {"input_images": [b64(png_bytes(64, 64))], "n": 2, "return_binary": True},
        "'return_binary' returns a single",
    ),
    (
        {"input_images": [b64(png_bytes(64, 64))], "model": "z-image-turbo"},
        "Invalid model ID 'z-image-turbo'",
    ),
    ({"input_images": [b64(png_bytes(64, 64))], "style_preset": "nope"}, "Unknown style_preset 'nope'"),
    (
        {"input_images": [b64(png_bytes(64, 64))], "match_image_size": 2},
        "Invalid value for 'match_image_size'",
    ),
    ({"input_images": "abc"}, "Invalid value for 'input_images'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_EDITS, ids=[m[:30] for _, m in BAD_EDITS])
async def test_bad_edits_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, extra: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    status, payload, _ = await edit(mesh, http, {"prompt": "x", **extra}, customer.headers)
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500


async def test_bad_multipart_edits_are_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    cases = [
        ({"prompt": "x", "image": "text instead of a file"}, "'image' must be a file upload"),
        (
            {"prompt": "x", "colour": "red", "image": png_bytes(64, 64)},
            "Unrecognized request argument supplied: colour",
        ),
        ({"image": png_bytes(64, 64)}, "Missing required parameter: 'prompt'"),
        ({"prompt": "x", "n": "many", "image": png_bytes(64, 64)}, "Invalid value for 'n'"),
        ({"prompt": "x", "image": bomb_png()}, "too large"),
    ]
    for fields, message in cases:
        form = aiohttp.FormData()
        for name, value in fields.items():
            if isinstance(value, bytes):
                form.add_field(name, value, filename=f"{name}.png", content_type="image/png")
            else:
                form.add_field(name, value)
        async with http.post(mesh.url + EDITS, data=form, headers=customer.headers) as response:
            payload = await response.json()
            assert response.status == 400, payload
        assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500
