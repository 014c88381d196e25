"""No request body stalls the edge or gets past it unread: length bounds on every string
field, the credential before a large body, whole-request form limits, and no byte of a
video to the service before a hold.

The edge runs here with billing only (no capability service: every answer checked
is given before any capability call, or the call fails and that is what is checked);
the video route's segmentation address is a recorder that notes every call it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from edge.routes import openapi_document
from services.billing.ledger import Ledger
from tests.conftest import Customer
from tests.stack import OfflineStack, offline_stack, settled_books

MIB = 1024 * 1024
#: 1 MiB that a backtracking pattern with overlapping quantifiers chokes on (the issue's
#: "C" + spaces + "x", which froze the loop at 20,000 characters); not base64 either.
HOSTILE = "C" + " " * (MIB - 2) + "x"
#: A 1x1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
FORM = "multipart/form-data"
JSON = "application/json"


class RecordingService(grpc.GenericRpcHandler):
    """A gRPC server standing in for a capability service: notes every call and the size of
    the first message it receives, then fails the call (UNAVAILABLE)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        recorder = self

        async def stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            recorder.calls.append(method)
            async for message in requests:
                recorder.received += len(message)
                break
            await context.abort(grpc.StatusCode.UNAVAILABLE, "recorder: not a real service")
            yield b""  # pragma: no cover (makes this a generator)

        return grpc.stream_stream_rpc_method_handler(stream_stream)


@dataclass
class Stack:
    """The offline stack (billing and the edge), with segmentation's recorder."""

    offline: OfflineStack
    recorder: RecordingService

    @property
    def url(self) -> str:
        return self.offline.url

    @property
    def ledger(self) -> Ledger:
        return self.offline.ledger

    async def customer(self, credits: str = "100", *, premium: bool = False) -> Customer:
        account_id, headers = await self.offline.customer(credits, premium=premium)
        return Customer(account_id, headers["X-API-Key"])


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    recorder = RecordingService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([recorder])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with offline_stack(
            tmp_path_factory.mktemp("hostile"), addresses={"segmentation": f"127.0.0.1:{port}"}
        ) as offline:
            yield Stack(offline, recorder)
    finally:
        await server.stop(0)


# --- the list of every string field, from the OpenAPI document ---


DOCUMENT = openapi_document()
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a schema (itself when it has none)."""
    schema = _resolve(schema)
    if "anyOf" in schema:
        return [_resolve(b) for b in schema["anyOf"] if b.get("type") != "null"]
    return [schema]


def _is_text(schema: dict[str, Any]) -> bool:
    """A string field (any string; enumerations too), or a field that takes anything."""
    return schema.get("type") == "string" or not (set(schema) - {"title", "description", "default"})


def minimal(schema: dict[str, Any]) -> Any:
    """The smallest instance of ``schema`` the parser accepts (required properties only)."""
    schema = _branches(schema)[0]
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal(props[name]) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal(schema["items"])]
    return {"integer": 1, "number": 1.0, "boolean": False}.get(kind, "x")  # type: ignore[arg-type]


def hostile_variants(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """``(field path, instance)`` for every string field reachable in ``schema``: the
    instance is minimal except for that one field, which holds :data:`HOSTILE`."""
    for branch in _branches(schema):
        kind = branch.get("type")
        if _is_text(branch):
            yield path, HOSTILE
        elif kind == "array":
            for where, value in hostile_variants(branch["items"], f"{path}[0]"):
                yield where, [value]
        elif kind == "object":
            base = minimal(branch)
            for name, prop in branch.get("properties", {}).items():
                for where, value in hostile_variants(prop, f"{path}.{name}" if path else name):
                    yield where, {**base, name: value}


@dataclass(frozen=True)
class Case:
    path: str
    media_type: str
    field: str
    body: dict[str, Any]
    files: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path} {self.media_type} {self.field}"


def hostile_cases() -> list[Case]:
    """Every string field of every route's request body (JSON and form), at 1 MiB."""
    cases: dict[str, Case] = {}
    for path, operations in DOCUMENT["paths"].items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media_type, entry in content.items():
                schema = _resolve(entry["schema"])
                files = tuple(
                    name
                    for name, prop in schema["properties"].items()
                    if prop.get("format") == "binary" and media_type == FORM
                )
                text_only = {
                    **schema,
                    "properties": {k: v for k, v in schema["properties"].items() if k not in files},
                }
                for field, body in hostile_variants(text_only):
                    case = Case(path, media_type, field, body, files)
                    cases.setdefault(str(case), case)
    return list(cases.values())


CASES = hostile_cases()


def test_the_list_of_fields_covers_every_route_with_a_body() -> None:
    routes = {
        (path, media_type)
        for path, operations in DOCUMENT["paths"].items()
        for operation in operations.values()
        for media_type in operation.get("requestBody", {}).get("content", {})
    }
    assert {(case.path, case.media_type) for case in CASES} == routes
    fields = {str(case) for case in CASES}
    for expected in (
        "/v1/music/generate application/json key_scale",
        "/v1/chat/completions application/json messages[0].content[0].image_url.url",
        "/v1/images/generations/batch application/json requests[0].prompt",
        f"/v1/images/img2video {FORM} prompt",
    ):
        assert expected in fields
    print(f"{len(CASES)} string fields on {len(routes)} route bodies")


def test_every_string_field_of_every_request_model_has_a_length_bound() -> None:
    """pydantic-core checks ``maxLength`` while it reads the string: before anything else
    looks at the value. Free-form fields (``Any``) are refused by rule, not bounded."""

    def unbounded(schema: dict[str, Any], path: str) -> Iterator[str]:
        for branch in _branches(schema):
            if path.count(".") > 8:  # a recursive schema: each level was checked once
                return
            if branch.get("type") == "string" and "maxLength" not in branch and "enum" not in branch:
                if "const" not in branch and branch.get("format") != "binary":
                    yield path
            elif branch.get("type") == "array":
                if "maxItems" not in branch:
                    yield f"{path}[] (a list without a bound)"
                yield from unbounded(branch["items"], f"{path}[0]")
            elif branch.get("type") == "object":
                for name, prop in branch.get("properties", {}).items():
                    yield from unbounded(prop, f"{path}.{name}")

    bodies = {
        f"{path} {media_type}": entry["schema"]
        for path, operations in DOCUMENT["paths"].items()
        for operation in operations.values()
        for media_type, entry in operation.get("requestBody", {}).get("content", {}).items()
    }
    assert bodies
    missing = [where for name, schema in bodies.items() for where in unbounded(schema, name)]
    assert missing == []


async def _send(http: aiohttp.ClientSession, url: str, case: Case, headers: dict[str, str]) -> Any:
    if case.media_type == JSON:
        return http.post(url + case.path, json=case.body, headers=headers)
    form = aiohttp.FormData()
    for name in case.files:
        form.add_field(name, PNG, filename="x.png", content_type="application/octet-stream")
    for name, value in case.body.items():
        form.add_field(name, value if isinstance(value, str) else str(value).lower())
    return http.post(url + case.path, data=form, headers=headers)


def waiting_for_cpu() -> float:
    """Seconds this thread has been ready to run but not running, since it started (Linux's
    schedstat; 0 elsewhere): time the machine gave to other processes."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def test_every_string_field_at_1_mib_is_a_fast_400_while_healthz_answers(stack: Stack) -> None:
    """The issue's check: each field of each route at 1 MiB is a 400 in under a second, and
    ``/healthz`` answers in under 100 ms all the while (nothing runs long on the loop).

    The edge, billing and this client share one thread here. On a shared machine (the test
    VM runs at a load of 8 on 2 cores) the OS may leave that thread waiting for a CPU for a
    few hundred ms; that wait (from the kernel's schedstat) is not the edge's and is taken
    out of each answer's time: what is bounded is the time the edge had and did not answer.
    Wall times are printed beside it."""
    headers = (await stack.customer("100", premium=True)).headers
    done = asyncio.Event()
    health_times: list[tuple[float, float]] = []  # (answer time the machine gave us, wall time)

    async def poll_health() -> None:
        async with aiohttp.ClientSession() as poller:
            while not done.is_set():
                started, queued = time.perf_counter(), waiting_for_cpu()
                async with poller.get(stack.url + "/healthz") as response:
                    assert response.status == 200
                wall = time.perf_counter() - started
                health_times.append((wall - (waiting_for_cpu() - queued), wall))
                await asyncio.sleep(0.005)

    poller = asyncio.create_task(poll_health())
    slow: list[str] = []
    wrong: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            for case in CASES:
                started = time.perf_counter()
                async with await _send(http, stack.url, case, headers) as response:
                    payload = await response.json()
                    status = response.status
                elapsed = time.perf_counter() - started
                if "error" in payload:
                    message, kind = payload["error"]["message"], payload["error"]["type"]
                else:  # the tasks routes answer in seed 003's shape
                    message = payload["data"]["message"]
                    kind = "invalid_request_error" if payload["success"] is False else "?"
                if status != 400 or kind != "invalid_request_error":
                    wrong.append(f"{case}: {status} {message[:200]}")
                elif " " * 101 in message or len(message) > 400:
                    wrong.append(f"{case}: the message quotes too much ({len(message)} characters)")
                if elapsed >= 1.0:
                    slow.append(f"{case}: {elapsed:.2f} s")
    finally:
        done.set()
        await poller
    assert wrong == []
    assert slow == []
    worst = max(answer for answer, _ in health_times)
    print(
        f"{len(CASES)} fields; /healthz answered {len(health_times)} times, the slowest in "
        f"{worst * 1000:.1f} ms ({max(wall for _, wall in health_times) * 1000:.1f} ms of wall time; "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    assert worst < 0.1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"prompt": "x", ' + b",".join(b'"k%d": 0' % i for i in range(1_000_000)) + b"}",
            "The request body holds more than 10000 strings.",
        ),
        (
            b'{"prompt": "x", "input_images": [' + b",".join(b"0" for _ in range(3_000_000)) + b"]}",
            "Invalid value for 'input_images[0]': Input should be a valid string",
        ),
        (
            b'{"messages": [' + b",".join(b"{}" for _ in range(2_000_000)) + b"]}",
            "Missing required parameter: 'messages[0].role'",
        ),
    ],
    ids=["a-million-unknown-keys", "three-million-list-items", "two-million-messages"],
)
async def test_a_dense_json_body_is_refused_at_its_first_fault(
    stack: Stack, raw: bytes, message: str
) -> None:
    """pydantic reports every unknown key and every bad list item: 12 MiB of unknown keys held
    the loop for 7 s. Strings are counted from the quotes before parsing; lists stop at their
    first bad item."""
    headers = (await stack.customer()).headers | {"Content-Type": JSON}
    path = "/v1/chat/completions" if raw.startswith(b'{"messages"') else "/v1/images/edits"
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url + path, data=raw, headers=headers) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["message"] == message
    print(f"{len(raw) / MIB:.1f} MiB: {(time.perf_counter() - started) * 1000:.0f} ms")


# --- the credential before the body ---


async def _raw_upload(url: str, head: dict[str, str], *, declared: int, send: int) -> tuple[bytes, int]:
    """Sends a request's headers (``Content-Length: declared``) and ``send`` bytes of its body,
    then keeps sending while it reads the answer. Returns the answer and how many body bytes
    the server let it send before it closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST {head.pop('path')} HTTP/1.1", f"Host: {host}", f"Content-Length: {declared}"]
    lines += [f"{name}: {value}" for name, value in head.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    chunk = b"-" * (64 * 1024)
    sent = 0
    while sent < send:
        writer.write(chunk)
        sent += len(chunk)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)

    async def keep_sending() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent < declared:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()

    await asyncio.wait_for(keep_sending(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return answer, sent


@pytest.mark.parametrize(
    "credential",
    [{}, {"X-API-Key": "sk-kiln-not-a-key"}, {"Authorization": "Bearer sk-kiln-not-a-key"}],
    ids=["none", "wrong-key", "wrong-bearer"],
)
async def test_an_unauthenticated_30_mib_upload_is_a_401_before_it_is_read(
    stack: Stack, credential: dict[str, str]
) -> None:
    head = {"path": "/v1/images/remove-background", "Content-Type": f"{FORM}; boundary=b", **credential}
    answer, sent = await _raw_upload(stack.url, head, declared=30 * MIB, send=64 * 1024)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"authentication_error" in answer
    assert b"Connection: close" in answer
    # The edge closed the connection instead of reading the upload (the kernel's buffers
    # took a few MiB at most before the writes failed).
    assert sent < 30 * MIB


async def _expect_continue(url: str, headers: dict[str, str]) -> bytes:
    """Sends only the headers of a 30 MiB upload with ``Expect: 100-continue`` (as curl does
    for bodies over 1 MiB) and returns the server's first answer, sent before any body byte."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [
        "POST /v1/images/remove-background HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {30 * MIB}",
        f"Content-Type: {FORM}; boundary=b",
        "Expect: 100-continue",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_expect_continue_is_answered_401_before_the_body_is_sent(stack: Stack) -> None:
    for credential in ({}, {"X-API-Key": "sk-kiln-not-a-key"}):
        answer = await _expect_continue(stack.url, credential)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"authentication_error" in answer and b"Connection: close" in answer
        assert b"100 Continue" not in answer
    answer = await _expect_continue(stack.url, (await stack.customer()).headers)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n"), answer[:200]


async def test_an_authenticated_upload_over_the_limit_is_a_413_before_it_is_read(stack: Stack) -> None:
    headers = (await stack.customer()).headers
    head = {"path": "/v1/images/remove-background", "Content-Type": f"{FORM}; boundary=b", **headers}
    answer, sent = await _raw_upload(stack.url, head, declared=30 * MIB, send=64 * 1024)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"larger than the limit of 26214400 bytes" in answer
    assert sent < 30 * MIB


async def test_a_small_body_without_a_valid_key_is_still_a_401(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"X-API-Key": "sk-kiln-nope"}):
            body = {"prompt": "x", "size": "256x256"}
            async with http.post(
                stack.url + "/v1/images/generations", json=body, headers=headers
            ) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"


# --- forms: limits for the whole request ---


async def _chunked(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "hostileboundary") -> list[bytes]:
    out = []
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return out


async def _post_form(
    stack: Stack, path: str, parts: list[bytes], headers: dict[str, str], *, chunked: bool
) -> tuple[int, dict[str, Any]]:
    content_type = {"Content-Type": f"{FORM}; boundary=hostileboundary"}
    data: Any = _chunked(parts) if chunked else b"".join(parts)
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url + path, data=data, headers=headers | content_type) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_form_of_1000_tiny_parts_is_a_413(stack: Stack, chunked: bool) -> None:
    headers = (await stack.customer()).headers
    parts = _multipart([("file", PNG, "x.png"), *((f"f{i}", b"x", None) for i in range(1000))])
    status, payload = await _post_form(stack, "/v1/images/segmentations", parts, headers, chunked=chunked)
    assert status == 413
    assert payload["error"] == {
        "message": "The form has more than 32 parts.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


async def test_1000_urlencoded_fields_are_a_413(stack: Stack) -> None:
    headers = (await stack.customer()).headers
    body = "&".join(f"f{i}=x" for i in range(1000))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            stack.url + "/v1/images/segmentations",
            data=body,
            headers=headers | {"Content-Type": "application/x-www-form-urlencoded"},
        ) as response,
    ):
        assert response.status == 413
        assert (await response.json())["error"]["message"] == "The form has more than 32 parts."


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_form_over_the_limit_across_many_parts_is_a_413(stack: Stack, chunked: bool) -> None:
    """30 images of 1 MiB: each is far below the 25 MiB body limit, together they are over it
    (aiohttp 3.13 bounded each part on its own). Without a length, they are counted as they come."""
    headers = (await stack.customer()).headers
    parts = _multipart(
        [("image[]", b"\x89PNG" + b"\0" * MIB, f"{i}.png") for i in range(30)] + [("prompt", b"x", None)]
    )
    status, payload = await _post_form(stack, "/v1/images/edits", parts, headers, chunked=chunked)
    assert status == 413
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"] == "The request body is larger than the limit of 26214400 bytes."


async def test_a_form_text_field_over_its_limit_is_a_400_naming_the_field(stack: Stack) -> None:
    headers = (await stack.customer()).headers
    parts = _multipart([("file", PNG, "x.png"), ("prompt", b"y" * (64 * 1024 + 1), None)])
    status, payload = await _post_form(stack, "/v1/images/remove-background", parts, headers, chunked=False)
    assert status == 400
    assert payload["error"]["message"] == "The form field 'prompt' is longer than 65536 bytes."


async def test_an_encoded_form_part_is_refused(stack: Stack) -> None:
    headers = (await stack.customer()).headers
    part = (
        b'--hostileboundary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        b"Content-Encoding: gzip\r\n\r\n" + PNG + b"\r\n--hostileboundary--\r\n"
    )
    status, payload = await _post_form(stack, "/v1/images/remove-background", [part], headers, chunked=False)
    assert status == 400
    assert payload["error"]["message"] == "The form part 'file' has an unsupported Content-Encoding."


# --- video: no byte to the service before a hold ---


def _video_form() -> list[bytes]:
    return _multipart(
        [("prompt", b"the cat", None), ("file", b"\0\0\0\x18ftypmp42" + b"\0" * 200_000, "v.mp4")]
    )


async def test_a_video_upload_of_an_account_that_cannot_pay_never_reaches_the_service(stack: Stack) -> None:
    before = (list(stack.recorder.calls), stack.recorder.received)
    broke = await stack.customer("0")
    status, payload = await _post_form(
        stack, "/v1/videos/remove-background", _video_form(), broke.headers, chunked=False
    )
    assert status == 402
    assert payload["error"]["type"] == "insufficient_credits"
    assert (stack.recorder.calls, stack.recorder.received) == before  # not one call, not one byte

    # The control: an account that can pay for a frame gets its upload streamed to the service
    # (here the recorder, which then fails the call as a broken service would: a 500, and
    # nothing is charged).
    paying = await stack.customer("10")
    status, payload = await _post_form(
        stack, "/v1/videos/remove-background", _video_form(), paying.headers, chunked=False
    )
    assert (status, payload["error"]["type"]) == (500, "processing_error"), payload
    assert stack.recorder.calls[len(before[0]) :] == [
        "/kiln.segmentation.v1.SegmentationService/RemoveVideoBackground"
    ]
    assert stack.recorder.received > 0
    books = await settled_books(stack.ledger, paying.account_id)
    assert (books.balance, books.held, books.open_holds) == (1000, 0, 0)
