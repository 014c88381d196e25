"""The OpenAI-shaped routes answer what OpenAI's own published OpenAPI document describes.

Real answers of the running mesh are validated with a JSON Schema 2020-12
validator against the response schemas of the matching operation in
``tests/openai/openapi.json`` (``openai/openai-openapi``, MIT; see the README
beside it); error answers against its ``ErrorResponse``, the body its SDKs
parse. The routes checked are those OpenAI also has: ``GET /v1/models``,
``POST /v1/chat/completions`` (plain and streamed), ``POST
/v1/images/generations``, ``POST /v1/images/edits`` (JSON and multipart) and
``POST /v1/audio/speech``. (OpenAI's ``/audio/voices`` is a POST that makes a
custom voice; Kiln's ``GET /v1/audio/voices`` lists voices, so it is not one
of them.)

Where the contract differs from OpenAI on purpose, the contract wins: each
such difference is in :data:`DEVIATIONS` with its reason, and nothing else may
differ. Any other mismatch fails the test.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest

from tests.conftest import Mesh, new_customer
from tests.edge.images_util import b64, png_bytes

OPENAI_DOCUMENT = Path(__file__).parents[1] / "openai" / "openapi.json"
BASE_URI = "https://openai-openapi.invalid/openapi.json"

#: (OpenAI operation, where in the answer) -> why the contract wins there. ``*`` is any index.
DEVIATIONS: dict[tuple[str, str], str] = {
    ("POST /images/generations", "/data/*/revised_prompt"): (
        "The contract answers revised_prompt: null (prompts are used as given); OpenAI's document "
        "types it as a string that is present only when a prompt was revised."
    ),
    ("POST /images/edits", "/data/*/revised_prompt"): (
        "As for generations: the contract's revised_prompt: null."
    ),
}
#: Speech: OpenAI's document names the bytes application/octet-stream; Kiln sends the audio's
#: own media type (audio/mpeg, audio/wav, ...), as the contract and OpenAI's served API do.
SPEECH_MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}


def _nullable(node: Any) -> Any:
    """OpenAI's 3.1 document still marks a few schemas ``nullable: true`` (OpenAPI 3.0): read
    them as meaning what they say, null allowed, which JSON Schema 2020-12 would ignore."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if isinstance(node.get("enum"), list):
            node["enum"] = [*node["enum"], None]
    return node


@functools.cache
def openai_document() -> dict[str, Any]:
    return dict(_nullable(json.loads(OPENAI_DOCUMENT.read_text())))


@functools.cache
def _registry() -> jsonschema_rs.Registry:
    return jsonschema_rs.Registry([(BASE_URI, openai_document())])


def response_pointer(operation: str, media_type: str = "application/json", status: str = "200") -> str:
    """The JSON pointer of OpenAI's schema for ``operation``'s answer (e.g. "POST /images/edits")."""
    method, path = operation.split(" ", 1)
    responses = openai_document()["paths"][path][method.lower()]["responses"]
    assert media_type in responses[status]["content"], (operation, media_type)
    escaped = path.replace("~", "~0").replace("/", "~1")
    return (
        f"/paths/{escaped}/{method.lower()}/responses/{status}/content/{media_type.replace('/', '~1')}/schema"
    )


@functools.cache
def _validator(pointer: str) -> Any:
    return jsonschema_rs.validator_for(
        {"$ref": BASE_URI + "#" + pointer}, registry=_registry(), validate_formats=True
    )


def mismatches(operation: str, pointer: str, answer: Any) -> list[str]:
    """Where ``answer`` breaks OpenAI's schema at ``pointer``, less the documented deviations."""
    found = []
    for error in _validator(pointer).iter_errors(answer):
        where = "/" + "/".join("*" if isinstance(p, int) else str(p) for p in error.instance_path)
        if (operation, where) not in DEVIATIONS:
            found.append(f"{operation} {where}: {error.message[:300]}")
    return found


def deviations_seen(operation: str, pointer: str, answer: Any) -> set[str]:
    """The allowed deviations ``answer`` shows (so the allow-list names only real ones)."""
    return {
        "/" + "/".join("*" if isinstance(p, int) else str(p) for p in error.instance_path)
        for error in _validator(pointer).iter_errors(answer)
    } & {where for (op, where) in DEVIATIONS if op == operation}


ERROR_POINTER = "/components/schemas/ErrorResponse"


def assert_conforms(operation: str, answer: Any, pointer: str | None = None) -> None:
    problems = mismatches(operation, pointer or response_pointer(operation), answer)
    assert not problems, "\n".join(problems)


def test_the_deviations_name_real_places_in_openais_document() -> None:
    for operation, _ in DEVIATIONS:
        response_pointer(operation)  # the operation exists and has a JSON answer
    image = openai_document()["components"]["schemas"]["Image"]
    assert image["properties"]["revised_prompt"] == {
        "type": "string",
        "description": image["properties"]["revised_prompt"]["description"],
    }


async def test_models_list_conforms(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    async with http.get(mesh.url + "/v1/models") as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["data"] and all(isinstance(m["created"], int) and m["created"] > 0 for m in answer["data"])
    assert_conforms("GET /models", answer)


async def test_chat_completion_and_its_stream_conform(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "seed": 1}
    async with http.post(mesh.url + "/v1/chat/completions", json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    [choice] = answer["choices"]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert_conforms("POST /chat/completions", answer)

    streamed = body | {"stream": True, "stream_options": {"include_usage": True}}
    async with http.post(
        mesh.url + "/v1/chat/completions", json=streamed, headers=customer.headers
    ) as response:
        assert response.status == 200
        frames = (await response.text()).strip().split("\n\n")
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]
    assert len(chunks) >= 3
    pointer = response_pointer("POST /chat/completions", "text/event-stream")
    for chunk in chunks:
        problems = mismatches("POST /chat/completions", pointer, chunk)
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_image_generations_conform_except_the_contracts_revised_prompt(
    mesh: Mesh, http: aiohttp.ClientSession, response_format: str
) -> None:
    customer = await new_customer(mesh, "10")
    body = {"prompt": "a red kite", "size": "256x256", "response_format": response_format}
    async with http.post(
        mesh.url + "/v1/images/generations", json=body, headers=customer.headers
    ) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["data"][0]["revised_prompt"] is None  # the contract's
    assert_conforms("POST /images/generations", answer)
    seen = deviations_seen("POST /images/generations", response_pointer("POST /images/generations"), answer)
    assert seen == {"/data/*/revised_prompt"}


async def test_image_edits_conform_as_json_and_as_openais_multipart(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    body = {"prompt": "make it green", "input_images": [b64(png_bytes(256, 256))], "response_format": "url"}
    async with http.post(mesh.url + "/v1/images/edits", json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert_conforms("POST /images/edits", await response.json())
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(256, 256), filename="cat.png", content_type="image/png")
    form.add_field("prompt", "add a hat")
    form.add_field("response_format", "b64_json")
    async with http.post(mesh.url + "/v1/images/edits", data=form, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert_conforms("POST /images/edits", await response.json())


@pytest.mark.parametrize("response_format", ["mp3", "wav"])
async def test_speech_answers_audio_bytes(
    mesh: Mesh, http: aiohttp.ClientSession, response_format: str
) -> None:
    response_pointer("POST /audio/speech", "application/octet-stream")  # OpenAI: raw bytes
    customer = await new_customer(mesh, "10")
    body = {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": response_format}
    async with http.post(mesh.url + "/v1/audio/speech", json=body, headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == SPEECH_MEDIA_TYPES[response_format]
        assert len(await response.read()) > 100


#: One request per OpenAI-shaped route that fails: (method, path, body, with a key).
FAILING: list[tuple[str, str, dict[str, Any] | None, bool]] = [
    ("GET", "/v1/nothing-here", None, True),
    ("POST", "/v1/chat/completions", {"messages": []}, True),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, False),
    ("POST", "/v1/images/generations", {"prompt": "x", "size": "300x300"}, True),
    ("POST", "/v1/images/generations", {"prompt": "x"}, False),
    ("POST", "/v1/images/edits", {"prompt": "x"}, True),
    ("POST", "/v1/audio/speech", {"model": "tts-1", "voice": "nobody", "input": "hi"}, True),
    ("POST", "/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "hi"}, False),
]


@pytest.mark.parametrize(("method", "path", "body", "keyed"), FAILING)
async def test_error_bodies_conform_with_param_and_code_null(
    mesh: Mesh, http: aiohttp.ClientSession, method: str, path: str, body: Any, keyed: bool
) -> None:
    customer = await new_customer(mesh, "0")  # no credits, not premium
    headers = customer.headers if keyed else {}
    async with http.request(method, mesh.url + path, json=body, headers=headers) as response:
        assert response.status >= 400
        answer = await response.json()
    # the contract's message and type, OpenAI's param and code beside them
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] is None and answer["error"]["code"] is None
    assert_conforms(f"{method} {path}", answer, ERROR_POINTER)
