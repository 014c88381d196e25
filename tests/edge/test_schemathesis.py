"""schemathesis fuzzes every operation of ``/openapi.json`` on the running mesh.

For each operation, hypothesis draws a bounded number of requests (valid ones
from the request schemas, then invalid ones) with a fixed seed, sent once with
a normal account's key and once with a premium account's. Every answer must be
no 5xx, a documented status, a documented content type, and a body that matches
the documented schema; invalid requests must be refused (4xx). Random valid
requests mostly fail the semantic checks (an unknown model, an odd size), so a
list of known-good requests first makes every kind of 200 (JSON, files, event
streams) go through the same checks. Each operation's fuzzing time is printed
(``pytest -s``).

The mesh runs on the test's event loop, so the synchronous schemathesis calls
run on a worker thread while the loop serves them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import hypothesis
import hypothesis.errors
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.media.audio import encode_audio
from tests.conftest import Mesh, new_customer
from tests.edge.images_util import b64, png_bytes
from tests.edge.media_util import moving_square_video, object_png

#: Requests per operation, generation mode and key (a fixed seed makes the run repeatable).
MAX_EXAMPLES = 12
SEED = 20261204
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Per request: the slowest valid request (a tiny image, a short song) answers well within this.
REQUEST_TIMEOUT_SECONDS = 120

#: Valid requests that would make minutes of media are scaled down to the contract's small end:
#: the answer's shape is what is checked here, not the models' speed. Field -> largest value sent
#: (in the body and in each of a batch's requests).
SMALL = {
    "duration": 2.0,  # music seconds
    "num_inference_steps": 2,
    "num_steps": 2,
    "num_frames": 5,
    "max_tokens": 8,
    "max_completion_tokens": 8,
    "n": 1,
    "variants": 1,
    "batch_size": 1,
    "width": 512,
    "height": 512,
}
#: schemathesis' refusals of an invalid request, plus 413: a body past the edge's size limit
#: (a string past its maxLength often is) is refused before it is parsed.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [
                    *("400", "401", "403", "404", "405", "406", "409", "413"),
                    *("415", "422", "428", "429", "5xx"),
                ]
            }
        }
    }
)
#: Fields set when a valid body leaves them out (their default would be long): path -> fields.
SHORT_DEFAULTS = {"/v1/music/generate": {"duration": 2.0}}


def _cap(value: Any) -> None:
    if isinstance(value, list):
        for item in value:
            _cap(item)
    elif isinstance(value, dict):
        for name, item in value.items():
            most = SMALL.get(name)
            if (
                most is not None
                and isinstance(item, int | float)
                and not isinstance(item, bool)
                and item > most
            ):
                value[name] = type(item)(most)
            else:
                _cap(item)


def _small(case: Case) -> Case:
    """Caps the size fields of a generated body (numbers only: everything else is the fuzzer's)."""
    if isinstance(case.body, dict):
        _cap(case.body)
        for name, value in SHORT_DEFAULTS.get(case.operation.path, {}).items():
            case.body.setdefault(name, value)
    return case


def _operations(document: dict[str, Any]) -> dict[str, APIOperation]:
    """Every operation of the document by label ("POST /v1/images/edits"); a part of the
    document schemathesis cannot read fails the test."""
    operations = {}
    for result in schemathesis.openapi.from_dict(document, config=CONFIG).get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()
        operations[result.ok().label] = result.ok()
    return operations


def _run_operation(
    operation: APIOperation,
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str],
    session: requests.Session,
) -> list[str]:
    """Draws MAX_EXAMPLES cases of ``operation`` in ``mode``; returns the failure found, if any
    (hypothesis stops at the first one; schemathesis' message has the curl line to replay it)."""
    strategy = operation.as_strategy(generation_mode=mode)
    checks: list[Callable[..., Any]] = list(CHECKS)
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    else:  # capping an invalid request's numbers could make it valid: valid ones only
        strategy = strategy.map(_small)

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(case=strategy)
    def fuzz(case: Case) -> None:
        case.call_and_validate(
            base_url=base_url,
            session=session,
            headers=headers,
            checks=checks,
            timeout=REQUEST_TIMEOUT_SECONDS,
        )

    try:
        fuzz()
    except hypothesis.errors.Unsatisfiable:  # no invalid request exists (an operation without input)
        assert mode is GenerationMode.NEGATIVE, operation.label
    except (Exception, FailureGroup) as exc:  # schemathesis' group of failed checks
        return [f"{operation.label} [{mode.value}]: {exc}"]
    return []


def _fuzz(document: dict[str, Any], base_url: str, keys: dict[str, str]) -> tuple[list[str], list[str]]:
    """Every operation of the document, with every key, in both modes: (failures, operations run)."""
    failures: list[str] = []
    labels: list[str] = []
    with requests.Session() as session:
        for operation in _operations(document).values():
            labels.append(operation.label)
            started = time.perf_counter()
            for account, key in keys.items():
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    found = _run_operation(operation, mode, base_url, {"X-API-Key": key}, session)
                    failures += [f"({account}) {failure}" for failure in found]
            print(f"{operation.label}: {time.perf_counter() - started:.1f} s")
    return failures, labels


def _known_good(media_id: str) -> dict[str, list[dict[str, Any]]]:
    """Requests that succeed, per operation (random ones mostly fail the semantic checks), so
    that every kind of 200 body, file and event stream is checked against the document too."""
    image = png_bytes(256, 256)
    form = "multipart/form-data"
    song = {"audio": _wav_b64(1.0), "num_inference_steps": 2}
    sse = {"Accept": "text/event-stream"}
    return {
        "POST /v1/images/generations": [
            {"body": {"prompt": "a kite", "size": "256x256"}},
            {"body": {"prompt": "a kite", "size": "256x256", "response_format": "b64_json"}},
            {"body": {"prompt": "a kite", "size": "256x256", "return_binary": True}},
        ],
        "POST /v1/images/generations/batch": [
            {
                "body": {
                    "requests": [
                        {"prompt": "a", "size": "256x256"},
                        {"prompt": "b", "size": "256x256", "n": 2},
                    ]
                }
            }
        ],
        "POST /v1/images/edits": [
            {"body": {"prompt": "green", "input_images": [b64(image)], "response_format": "url"}},
            {"body": {"prompt": "a hat", "image": image, "response_format": "b64_json"}, "media_type": form},
        ],
        "POST /v1/images/segmentations": [
            {"body": {"file": object_png(), "prompt": "red disc"}, "media_type": form},
            {
                "body": {"file": object_png(), "prompt": "red disc"},
                "media_type": form,
                "headers": {"Accept": "application/json"},
            },
        ],
        "POST /v1/images/remove-background": [
            {"body": {"file": object_png(), "prompt": "red disc"}, "media_type": form}
        ],
        "POST /v1/videos/remove-background": [
            {"body": {"file": moving_square_video(frames=4), "prompt": "blue square"}, "media_type": form}
        ],
        "POST /v1/images/upscale": [{"body": {"image": b64(png_bytes(64, 64)), "method": "lanczos"}}],
        "POST /v1/chat/completions": [
            {"body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, "premium": True},
            {
                "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
                "premium": True,
            },
        ],
        "POST /v1/audio/speech": [
            {"body": {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": fmt}}
            for fmt in ("mp3", "wav")
        ],
        "POST /v1/audio/clone": [
            {
                "body": {
                    "text": "Hi.",
                    "ref_audio": _wav_b64(2.0),
                    "ref_text": "Reference text here",
                    "language": "English",
                    "seed": 1,
                }
            }
        ],
        "POST /v1/music/generate": [
            {"body": {"prompt": "calm piano", "duration": 1.0, "num_inference_steps": 2}},
            {
                "body": {"prompt": "calm piano", "duration": 1.0, "num_inference_steps": 2},
                "query": {"response_format": "json"},
            },
            {"body": {"prompt": "calm piano", "duration": 1.0, "num_inference_steps": 2}, "headers": sse},
        ],
        "POST /v1/music/cover": [{"body": {"prompt": "jazz", **song}, "query": {"response_format": "json"}}],
        "POST /v1/music/repaint": [{"body": {"prompt": "jazz", "start": 0.2, "end": 0.6, **song}}],
        "POST /v1/images/img2video": [
            {"body": {"image": png_bytes(208, 120), "prompt": "a pan", "num_frames": 5}, "media_type": form},
            {
                "body": {"image": png_bytes(208, 120), "prompt": "a pan", "num_frames": 5},
                "media_type": form,
                "headers": sse,
            },
        ],
        "GET /v1/images/user-videos": [{"query": {"limit": 5, "sortBy": "oldest"}}],
        "GET /v1/media/{media_id}": [{"path_parameters": {"media_id": media_id}}],
    }


def _wav_b64(seconds: float, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes()
    return b64(encode_audio(pcm, rate, "wav")[0])


def _check_known_good(
    document: dict[str, Any], base_url: str, keys: dict[str, str], media_id: str
) -> list[str]:
    """Sends each known-good request; each must be a 200 that passes every check."""
    operations = _operations(document)
    failures: list[str] = []
    with requests.Session() as session:
        for label, cases in _known_good(media_id).items():
            for fields in cases:
                fields = dict(fields)
                key = keys["premium" if fields.pop("premium", False) else "normal"]
                if "body" in fields:
                    fields.setdefault("media_type", "application/json")
                case = operations[label].Case(**fields)
                try:
                    response = case.call_and_validate(
                        base_url=base_url,
                        session=session,
                        headers={"X-API-Key": key},
                        checks=[*CHECKS, ignored_auth],  # the same request without or with a bad key: 401
                        timeout=REQUEST_TIMEOUT_SECONDS,
                    )
                except (Exception, FailureGroup) as exc:
                    failures.append(f"{label} {fields.get('query', '')}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{label}: {response.status_code} {response.text[:300]}")
    return failures


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
async def test_every_operation_answers_as_documented_under_fuzzing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    normal = await new_customer(mesh, "100000")
    premium = await new_customer(mesh, "0", premium=True)
    keys = {"normal": normal.key, "premium": premium.key}
    async with http.get(mesh.url + "/openapi.json") as response:
        document = await response.json()
    async with http.post(
        mesh.url + "/v1/images/generations",
        json={"prompt": "a kite", "size": "256x256"},
        headers=normal.headers,
    ) as response:
        media_id = (await response.json())["data"][0]["url"].rsplit("/", 1)[1]
    await _clone_model_ready(mesh, http)
    failures = await asyncio.to_thread(_check_known_good, document, mesh.url, keys, media_id)
    assert not failures, "\n\n".join(failures)
    failures, labels = await asyncio.to_thread(_fuzz, document, mesh.url, keys)
    assert not failures, "\n\n".join(failures[:20]) + f"\n\n{len(failures)} failures"
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert set(labels) == documented  # every operation was fuzzed


async def test_a_multipart_part_with_a_malformed_header_is_a_400(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    """Found by the fuzzer: a part whose header line is not ``Name: value`` was a 500."""
    customer = await new_customer(mesh, "10")
    boundary = "62d3f8b6ccae359cbf38de36d7ea06f6"
    body = f"--{boundary}\r\n549--{boundary}--\r\n".encode()
    headers = customer.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for path in ("/v1/images/remove-background", "/v1/images/segmentations", "/v1/images/edits"):
        async with http.post(mesh.url + path, data=body, headers=headers) as response:
            assert response.status == 400, await response.text()
            assert (await response.json())["error"]["type"] == "invalid_request_error"


#: Found by the fuzzer: numbers past what their protobuf field holds were a 500 ("Value out of range").
TOO_BIG = [
    ("GET", "/v1/images/user-videos?offset=2064159421579317036068110336", None),
    ("POST", "/v1/music/generate", {"prompt": "x", "bpm": 5115130581}),
    ("POST", "/v1/music/generate", {"prompt": "x", "num_inference_steps": 2**40}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**40}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}),
]


@pytest.mark.parametrize(("method", "path", "body"), TOO_BIG)
async def test_numbers_too_big_for_their_field_are_400s(
    mesh: Mesh, http: aiohttp.ClientSession, method: str, path: str, body: Any
) -> None:
    customer = await new_customer(mesh, "10", premium=True)
    async with http.request(method, mesh.url + path, json=body, headers=customer.headers) as response:
        assert response.status == 400, await response.text()
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def _clone_model_ready(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    """The voice-cloning model loads after the default voice: wait until it lists languages."""
    async with asyncio.timeout(180):
        while True:
            async with http.get(mesh.url + "/v1/audio/clone/languages") as response:
                if any(model["languages"] for model in (await response.json())["data"]):
                    return
            await asyncio.sleep(0.2)
