"""Output options on generations (and the shared helpers edits use): sizes, formats,
binary answers, metadata, variants, style presets, timing and gzip."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mesh, balance, new_customer
from tests.edge.images_util import open_image

GEN = "/v1/images/generations"


async def generate(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(mesh.url + GEN, json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({"aspect_ratio": "16:9"}, (1024, 576)),
        ({"aspect_ratio": "9:16", "resolution": "1K"}, (576, 1024)),
        ({"aspect_ratio": "21:9"}, (1024, 432)),
        ({"width": 320, "height": 192}, (320, 192)),
    ],
)
async def test_aspect_ratios_tiers_and_direct_sizes(
    mesh: Mesh, http: aiohttp.ClientSession, options: dict[str, Any], size: tuple[int, int]
) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "a fjord", "num_inference_steps": 1, "response_format": "b64_json", **options}
    status, payload, _ = await generate(mesh, http, body, customer.headers)
    assert status == 200, payload
    assert open_image(base64.b64decode(payload["data"][0]["b64_json"])).size == size


@pytest.mark.parametrize(
    ("fmt", "pil", "mime"),
    [("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")],
)
async def test_formats_are_encoded_and_served_with_their_mime_type(
    mesh: Mesh, http: aiohttp.ClientSession, fmt: str, pil: str, mime: str
) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "a lamp", "size": "256x256", "num_inference_steps": 1, "format": fmt}
    status, payload, _ = await generate(mesh, http, body, customer.headers)
    assert status == 200, payload
    [item] = payload["data"]
    assert open_image(base64.b64decode(item["b64_json"])).format == pil
    async with http.get(item["url"]) as media:
        assert media.headers["Content-Type"] == mime
        assert open_image(await media.read()).format == pil


async def test_return_binary_answers_with_the_file(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "a kite", "size": "256x256", "return_binary": True, "format": "webp", "seed": 9}
    async with http.post(mesh.url + GEN, json=body, headers=customer.headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/webp"
        assert response.headers["X-Seed"] == "9"
        assert "inference;dur=" in response.headers["Server-Timing"]
        data = await response.read()
        location = response.headers["Content-Location"]
    assert open_image(data).format == "WEBP"
    async with http.get(mesh.url + location) as media:
        assert await media.read() == data
    status, payload, _ = await generate(mesh, http, {**body, "variants": 2}, customer.headers)
    assert status == 400 and "single image" in payload["error"]["message"]


async def test_embedded_metadata_in_png_and_jpeg_and_absent_by_default(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh)
    base = {
        "prompt": "a red barn",
        "negative_prompt": "fog",
        "size": "256x256",
        "seed": 77,
        "num_inference_steps": 2,
    }
    status, payload, _ = await generate(mesh, http, {**base, "embed_exif_metadata": True}, customer.headers)
    assert status == 200
    png = open_image(base64.b64decode(payload["data"][0]["b64_json"]))
    text = png.text  # type: ignore[attr-defined]
    assert text["prompt"] == "a red barn" and text["negative_prompt"] == "fog"
    assert text["seed"] == "77" and text["steps"] == "2" and text["model"] == "z-image-turbo"
    status, payload, _ = await generate(
        mesh, http, {**base, "embed_exif_metadata": True, "format": "jpeg"}, customer.headers
    )
    jpeg = open_image(base64.b64decode(payload["data"][0]["b64_json"]))
    assert "a red barn" in str(jpeg.getexif().get(0x010E))  # ImageDescription
    status, payload, _ = await generate(mesh, http, base, customer.headers)
    plain = open_image(base64.b64decode(payload["data"][0]["b64_json"]))
    assert "prompt" not in getattr(plain, "text", {})


async def test_variants_style_presets_and_the_style_list(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    async with http.get(mesh.url + "/v1/images/styles") as response:
        styles = {s["id"]: s for s in (await response.json())["data"]}
    assert {"cinematic", "anime", "photographic", "pixel-art"} <= set(styles)
    body = {
        "prompt": "a fox",
        "size": "256x256",
        "num_inference_steps": 1,
        "variants": 3,
        "style_preset": "cinematic",
        "embed_exif_metadata": True,
        "response_format": "b64_json",
    }
    status, payload, headers = await generate(mesh, http, body, customer.headers)
    assert status == 200, payload
    assert len(payload["data"]) == 3
    prompt = open_image(base64.b64decode(payload["data"][0]["b64_json"])).text["prompt"]  # type: ignore[attr-defined]
    assert prompt == styles["cinematic"]["prompt"].replace("{prompt}", "a fox")
    # 3 images at (0.25 + 0.5 * 0.065536) * 1 / 8 = 0.0353 -> 0.04 each
    assert headers["X-Credits-Charged"] == "0.12"
    status, payload, _ = await generate(mesh, http, {**body, "n": 2}, customer.headers)
    assert status == 400 and "same parameter" in payload["error"]["message"]


async def test_timing_is_measured_for_every_phase(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh)
    status, payload, headers = await generate(
        mesh, http, {"prompt": "a bell", "size": "256x256"}, customer.headers
    )
    assert status == 200
    timing = payload["timing"]
    assert set(timing) == {"queue_ms", "inference_ms", "encode_ms", "store_ms", "total_ms"}
    assert all(value >= 0 for value in timing.values())
    assert timing["inference_ms"] > 0 and timing["encode_ms"] > 0
    assert timing["total_ms"] >= timing["inference_ms"] + timing["encode_ms"]
    assert headers["Server-Timing"].startswith("queue;dur=")


BAD_OPTIONS = [
    ({"aspect_ratio": "5:4"}, "Invalid aspect_ratio '5:4'"),
    ({"resolution": "8K"}, "Invalid resolution '8K'"),
    (
        {"resolution": "4K"},
        "The resolution 4K at 1:1 (4096x4096) exceeds the maximum allowed for the z-image-turbo model (1792x1792)",
    ),
    (
        {"aspect_ratio": "16:9", "resolution": "2K"},
        "(2048x1152) exceeds the maximum allowed for the z-image-turbo model",
    ),
    ({"aspect_ratio": "1:1", "size": "256x256"}, "Give the output size one way only"),
    ({"width": 1000, "height": 1000}, "must be multiples of 16"),
    ({"width": 2048, "height": 1024}, "The dimensions 2048x1024 exceed the maximum allowed"),
    ({"format": "gif"}, "Invalid value for 'format'"),
    ({"format": "png", "output_format": "jpeg"}, "'format' and 'output_format' are the same parameter"),
    ({"return_binary": "yes"}, "Invalid value for 'return_binary'"),
    ({"style_preset": "vaporwave"}, "Unknown style_preset 'vaporwave'"),
    ({"variants": 5}, "The number of images must be between 1 and 4"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m[:30] for _, m in BAD_OPTIONS])
async def test_bad_options_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, options: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    status, payload, _ = await generate(mesh, http, {"prompt": "x", **options}, customer.headers)
    assert status == 400, payload
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500


async def test_gzip_is_used_when_the_client_accepts_it(mesh: Mesh) -> None:
    customer = await new_customer(mesh)
    body = {"prompt": "a tree", "size": "256x256", "num_inference_steps": 1}
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        for accept, compressed in (("gzip, deflate", True), ("identity", False)):
            headers = {**customer.headers, "Accept-Encoding": accept}
            async with raw.post(mesh.url + GEN, json=body, headers=headers) as response:
                assert response.status == 200
                assert (response.headers.get("Content-Encoding") == "gzip") is compressed
                data = await response.read()
            if compressed:
                import gzip

                data = gzip.decompress(data)
            assert data.startswith(b"{")
