"""GET /v1/media/{id}, /v1/models, /healthz, /readyz and /openapi.json."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp

from edge.app import create_app
from tests.conftest import Mesh, new_customer


async def _generated_url(mesh: Mesh, http: aiohttp.ClientSession) -> str:
    customer = await new_customer(mesh)
    body = {"prompt": "a tree", "size": "256x256", "response_format": "url"}
    async with http.post(
        mesh.url + "/v1/images/generations", json=body, headers=customer.headers
    ) as response:
        assert response.status == 200
        return str((await response.json())["data"][0]["url"])


async def test_media_is_public_cacheable_and_conditional(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    url = await _generated_url(mesh, http)
    media_id = url.rsplit("/", 1)[1]
    assert len(media_id) == 24  # 144 random bits
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        assert "max-age=3600" in response.headers["Cache-Control"]
        etag = response.headers["ETag"]
        last_modified = response.headers["Last-Modified"]
        assert (await response.read()).startswith(b"\x89PNG")
    async with http.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert await response.read() == b""
    async with http.get(url, headers={"If-Modified-Since": last_modified}) as response:
        assert response.status == 304
    async with http.get(url, headers={"If-None-Match": '"other"'}) as response:
        assert response.status == 200


async def test_unknown_or_malformed_media_ids_are_404_envelopes(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    for media_id in ("A" * 24, "xyz789", "..%2F..%2Fetc%2Fpasswd", "a" * 300):
        async with http.get(f"{mesh.url}/v1/media/{media_id}") as response:
            assert response.status == 404
            payload = await response.json()
            assert payload["error"]["type"] == "not_found_error"


async def test_models_lists_ids_aliases_limits_defaults_and_price(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    async with http.get(mesh.url + "/v1/models") as response:
        assert response.status == 200
        models = {m["id"]: m for m in (await response.json())["data"]}
    turbo = models["z-image-turbo"]
    assert set(turbo["aliases"]) == {
        "flux-schnell",
        "qwen/qwen-image",
        "pixart-sigma",
        "dall-e-3",
        "dall-e-2",
    }
    assert turbo["capability"] == "text-to-image"
    assert models["black-forest-labs/FLUX.2-klein-4B"]["capabilities"] == ["image-edit", "text-to-image"]
    assert turbo["limits"]["max_width"] == 1792 and turbo["limits"]["max_height"] == 1792
    assert turbo["defaults"]["steps"] == 8
    assert "megapixels" in turbo["pricing"]["formula"]
    assert models["longcat-image-edit"]["limits"]["max_height"] == 1024


async def test_health_readiness_and_openapi(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    async with http.get(mesh.url + "/healthz") as response:
        assert response.status == 200
    async with http.get(mesh.url + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["services"] == {
            "billing": True,
            "image_gen": True,
            "segmentation": True,
            "upscale": True,
            "llm": True,
            "tts": True,
            "music": True,
            "video": True,
        }
    async with http.get(mesh.url + "/openapi.json") as response:
        document = await response.json()
    generation = document["paths"]["/v1/images/generations"]["post"]
    schema_ref = generation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"prompt", "image_size", "num_inference_steps", "response_format"} <= set(schema["properties"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def test_openapi_documents_every_route_the_router_serves_with_its_bodies(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    """The document against the router of a real edge app (not the table both come from): every
    method and path it serves is documented, each with a 200 body and its error statuses in the
    envelope. That the answers match these schemas is tests/edge/test_schemathesis.py's part."""
    async with http.get(mesh.url + "/openapi.json") as response:
        document = await response.json()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in create_app(mesh.settings).router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    schemas = document["components"]["schemas"]
    for ref in set(_refs(document)):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert responses["200"]["content"], (method, path)  # every answer's body is described
            for status, answer in responses.items():
                if (method, path, status) == ("get", "/v1/media/{media_id}", "416"):
                    assert "content" not in answer  # aiohttp's bodyless Range Not Satisfiable
                elif int(status) >= 400 and (method, path) != ("get", "/readyz"):
                    # The tasks routes answer errors in seed 003's shape; every other route in the contract's.
                    envelope = "TaskError" if path.startswith("/v1/tasks") else "ErrorResponse"
                    assert answer["content"] == {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{envelope}"}}
                    }, (method, path, status)
            if "security" in operation:
                assert "401" in responses, (method, path)
    error = schemas["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
