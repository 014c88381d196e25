"""schemathesis fuzzes every operation of ``/openapi.json`` on the running mesh.

For each operation, hypothesis draws a bounded number of requests (valid ones
from the request schemas, then invalid ones) with a fixed seed, sent once with
a normal account's key and once with a premium account's. Every answer must be
no 5xx, a documented status, a documented content type, and a body that matches
the documented schema; invalid requests must be refused (4xx).

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
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Mesh, new_customer

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


def _run_operation(
    operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], session: requests.Session
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
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    labels: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            labels.append(operation.label)
            started = time.perf_counter()
            for account, key in keys.items():
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    found = _run_operation(operation, mode, base_url, {"X-API-Key": key}, session)
                    failures += [f"({account}) {failure}" for failure in found]
            print(f"{operation.label}: {time.perf_counter() - started:.1f} s")
    return failures, labels


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
async def test_every_operation_answers_as_documented_under_fuzzing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    normal = await new_customer(mesh, "100000")
    premium = await new_customer(mesh, "0", premium=True)
    async with http.get(mesh.url + "/openapi.json") as response:
        document = await response.json()
    failures, labels = await asyncio.to_thread(
        _fuzz, document, mesh.url, {"normal": normal.key, "premium": premium.key}
    )
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
