"""Dry runs (``?dry_run=true``, or ``dry_run`` in the body or form) on every paid route: the
price billing would hold for the real call, with nothing held, run, stored or claimed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from services.common.media.audio import encode_audio
from tests.conftest import SPANS, Mesh, new_customer
from tests.edge.images_util import b64, png_bytes
from tests.edge.media_util import moving_square_video, object_png
from tests.stack import books

#: Billing is the same on both databases; the prices are what is checked here.
SQLITE = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)

BILLING = "/kiln.billing.v1.BillingService/"
#: The only calls a dry run makes (besides the video probe): billing's read-only pair.
DRY_RUN_CALLS = {BILLING + "Authenticate", BILLING + "Quote"}
VIDEO_PROBE = "/kiln.segmentation.v1.SegmentationService/RemoveVideoBackground"


@dataclass(frozen=True)
class File:
    data: bytes
    filename: str
    content_type: str


@dataclass(frozen=True)
class Call:
    """One paid request: a JSON body, or form fields in order (a File is an upload)."""

    path: str
    body: dict[str, Any] | None = None
    form: Callable[[], list[tuple[str, str | File]]] | None = None
    premium: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes()
    return encode_audio(pcm, rate, "wav")[0]


def _png(width: int = 64, height: int = 64) -> File:
    return File(png_bytes(width, height), "input.png", "image/png")


SONG = {"prompt": "calm piano", "num_inference_steps": 2}
CLONE = {"text": "Hi.", "ref_text": "Reference text here", "language": "English", "seed": 1}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

#: Every paid route, and each of its billed paths (JSON and multipart, whole and streamed).
CALLS: dict[str, Call] = {
    "generations": Call("/v1/images/generations", {"prompt": "a kiln", "size": "256x256"}),
    "generations-batch": Call(
        "/v1/images/generations/batch",
        {"requests": [{"prompt": "a", "size": "256x256"}, {"prompt": "b", "size": "512x512", "n": 2}]},
    ),
    "edits-json": Call(
        "/v1/images/edits",
        {"prompt": "green", "input_images": [b64(png_bytes(128, 128))], "size": "256x256"},
    ),
    "edits-form": Call(
        "/v1/images/edits", form=lambda: [("prompt", "a hat"), ("size", "256x256"), ("image", _png(128, 128))]
    ),
    "segmentations": Call(
        "/v1/images/segmentations",
        form=lambda: [("prompt", "red disc"), ("file", File(object_png(), "in.png", "image/png"))],
    ),
    "remove-background": Call(
        "/v1/images/remove-background",
        form=lambda: [("prompt", "red disc"), ("file", File(object_png(), "in.png", "image/png"))],
    ),
    "videos-remove-background": Call(
        "/v1/videos/remove-background",
        form=lambda: [
            ("prompt", "blue square"),
            ("file", File(moving_square_video(frames=6), "clip.mp4", "video/mp4")),
        ],
    ),
    "upscale": Call("/v1/images/upscale", {"image": b64(png_bytes(64, 48)), "method": "lanczos", "scale": 2}),
    "chat": Call("/v1/chat/completions", CHAT, premium=True),
    "chat-stream": Call("/v1/chat/completions", CHAT | {"stream": True}, premium=True),
    "speech": Call("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "Hello."}),
    "speech-stream": Call(
        "/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "wav"}
    ),
    "clone": Call("/v1/audio/clone", CLONE | {"ref_audio": b64(_wav(2.0))}),
    "clone-stream": Call("/v1/audio/clone", CLONE | {"ref_audio": b64(_wav(2.0)), "stream": True}),
    "music-generate": Call("/v1/music/generate", SONG | {"duration": 1.0}),
    "music-cover": Call(
        "/v1/music/cover",
        form=lambda: [
            ("prompt", "jazz"),
            ("num_inference_steps", "2"),
            ("audio", File(_wav(1.0), "song.wav", "audio/wav")),
        ],
    ),
    "music-repaint": Call("/v1/music/repaint", SONG | {"audio": b64(_wav(1.0)), "start": 0.2, "end": 0.6}),
    "img2video": Call(
        "/v1/images/img2video",
        form=lambda: [
            ("prompt", "a pan"),
            ("num_frames", "5"),
            ("num_steps", "2"),
            ("image", _png(208, 120)),
        ],
    ),
}


def _form(fields: list[tuple[str, str | File]]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields:
        if isinstance(value, File):
            data.add_field(name, value.data, filename=value.filename, content_type=value.content_type)
        else:
            data.add_field(name, value)
    return data


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw, parse_float=Decimal)  # numbers exactly as sent


async def send(
    http: aiohttp.ClientSession,
    mesh: Mesh,
    call: Call,
    headers: dict[str, str],
    *,
    dry: str | None = None,
    query: dict[str, str] | None = None,
    changes: dict[str, Any] | None = None,
) -> Answer:
    """``call`` as is, or a dry run: ``dry="query"`` (?dry_run=true) or ``"field"`` (the body's or
    form's ``dry_run``, first in a form); ``changes`` replace body fields."""
    params = dict(query or {})
    if dry == "query":
        params["dry_run"] = "true"
    kwargs: dict[str, Any] = {"params": params, "headers": call.headers | headers}
    if call.form is not None:
        fields = [(name, value) for name, value in call.form() if name not in (changes or {})]
        fields = [(name, str(value)) for name, value in (changes or {}).items()] + fields
        kwargs["data"] = _form([("dry_run", "true")] * (dry == "field") + fields)
    else:
        body = dict(call.body or {}) | (changes or {})
        kwargs["json"] = body | ({"dry_run": True} if dry == "field" else {})
    async with http.post(mesh.url + call.path, **kwargs) as response:
        return Answer(response.status, dict(response.headers), await response.read())


async def reservations(mesh: Mesh, account_id: str) -> list[tuple[str, int]]:
    """(state, amount held) of the account's reservations."""
    rows = await mesh.ledger.db.run(
        lambda tx: tx.all("SELECT state, amount FROM reservations WHERE account_id = ?", (account_id,)),
        write=False,
    )
    return [(str(state), int(amount)) for state, amount in rows]


def _media_files(mesh: Mesh) -> set[Path]:
    return {path for path in Path(mesh.settings.resolved_media_root).rglob("*") if path.is_file()}


def _trace_calls(request_id: str) -> set[str]:
    """The names of the spans of the trace of the edge request ``request_id``."""
    spans = SPANS.get_finished_spans()
    edge = [s for s in spans if (s.attributes or {}).get("kiln.request_id") == request_id]
    assert len(edge) == 1, f"no edge span for {request_id}"
    trace_id = edge[0].context.trace_id
    return {s.name for s in spans if s.context.trace_id == trace_id and s is not edge[0]}


def check_preview(answer: Answer) -> dict[str, Any]:
    assert answer.status == 200, answer.raw
    assert answer.headers["Content-Type"].startswith("application/json")
    preview: dict[str, Any] = answer.json()
    assert preview["object"] == "price_preview" and preview["dry_run"] is True
    assert isinstance(preview["cost"], int | Decimal)  # a JSON number, its exact decimal text (not a float)
    assert preview["cost"] * 100 == preview["cost_hundredths"]
    assert sum(item["cost_hundredths"] for item in preview["items"]) == preview["cost_hundredths"]
    for item in preview["items"]:
        assert item["cost"] * 100 == item["cost_hundredths"] and item["kind"] and item["model"]
    return preview


async def _clone_model_ready(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    """The voice-cloning model loads after the default voice: wait until it lists languages."""
    async with asyncio.timeout(180):
        while True:
            async with http.get(mesh.url + "/v1/audio/clone/languages") as response:
                if any(model["languages"] for model in (await response.json())["data"]):
                    return
            await asyncio.sleep(0.2)


@SQLITE
@pytest.mark.parametrize("name", list(CALLS))
async def test_a_dry_run_costs_what_the_real_call_holds_and_holds_and_runs_nothing(
    mesh: Mesh, http: aiohttp.ClientSession, name: str
) -> None:
    call = CALLS[name]
    if call.path == "/v1/audio/clone":
        await _clone_model_ready(mesh, http)
    customer = await new_customer(mesh, "100", premium=call.premium)
    stored = _media_files(mesh)
    SPANS.clear()
    previews = []
    for how in ("query", "field"):
        answer = await send(http, mesh, call, customer.headers, dry=how)
        previews.append(check_preview(answer))
        made = _trace_calls(answer.headers["X-Request-ID"])
        allowed = DRY_RUN_CALLS | ({VIDEO_PROBE} if "videos" in call.path else set())
        assert DRY_RUN_CALLS <= made <= allowed, made
    assert previews[0] == previews[1]
    preview = previews[0]
    assert preview["balance_sufficient"] is True
    state = await books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held) == (10_000, 0)
    assert await reservations(mesh, customer.account_id) == []
    assert _media_files(mesh) <= stored  # nothing stored (the retention sweep may remove files)

    real = await send(http, mesh, call, customer.headers)
    assert real.status == 200, real.raw[:500]
    held = [amount for state, amount in await reservations(mesh, customer.account_id) if state == "committed"]
    assert held == [
        preview["cost_hundredths"]
    ]  # the hold of the real call (a video's entry hold is released)
    if call.premium:
        assert preview["cost_hundredths"] == 0


@SQLITE
async def test_the_preview_lists_each_item_with_what_it_is_priced_by(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    answer = await send(http, mesh, CALLS["generations-batch"], customer.headers, dry="query")
    preview = check_preview(answer)
    # z-image-turbo at 8 steps: 256x256 is 0.29 credits; 512x512 is 0.39 an image, 2 of them.
    assert b'"cost":1.07,' in answer.raw
    assert preview == {
        "object": "price_preview",
        "dry_run": True,
        "cost": Decimal("1.07"),
        "cost_hundredths": 107,
        "items": [
            {
                "kind": "image_generation",
                "model": "z-image-turbo",
                "width": 256,
                "height": 256,
                "steps": 8,
                "count": 1,
                "cost": Decimal("0.29"),
                "cost_hundredths": 29,
            },
            {
                "kind": "image_generation",
                "model": "z-image-turbo",
                "width": 512,
                "height": 512,
                "steps": 8,
                "count": 2,
                "cost": Decimal("0.78"),
                "cost_hundredths": 78,
            },
        ],
        "balance_sufficient": True,
    }


@SQLITE
async def test_a_premium_account_is_quoted_its_price_zero(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "0", premium=True)
    call = CALLS["segmentations"]
    preview = check_preview(await send(http, mesh, call, customer.headers, dry="query"))
    assert preview["cost_hundredths"] == 0 and preview["balance_sufficient"] is True
    assert (await send(http, mesh, call, customer.headers)).status == 200
    assert await reservations(mesh, customer.account_id) == [("committed", 0)]


@SQLITE
async def test_a_premium_only_model_is_the_same_403_in_a_dry_run(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    call = CALLS["generations"]
    changes = {"model": "z-image-turbo-premium"}
    dry = await send(http, mesh, call, customer.headers, dry="query", changes=changes)
    real = await send(http, mesh, call, customer.headers, changes=changes)
    assert dry.status == real.status == 403
    assert dry.json() == real.json()


@SQLITE
@pytest.mark.parametrize("name", ["generations", "videos-remove-background", "speech-stream"])
async def test_an_account_that_cannot_pay_gets_the_price_and_balance_sufficient_false(
    mesh: Mesh, http: aiohttp.ClientSession, name: str
) -> None:
    customer = await new_customer(mesh, "0")
    call = CALLS[name]
    preview = check_preview(await send(http, mesh, call, customer.headers, dry="query"))
    assert preview["cost_hundredths"] > 0 and preview["balance_sufficient"] is False
    real = await send(http, mesh, call, customer.headers)
    assert real.status == 402
    assert await reservations(mesh, customer.account_id) == []


BAD_INPUT: list[tuple[str, dict[str, Any]]] = [
    ("generations", {"size": "13x13"}),
    ("generations", {"prompt": 7}),
    ("generations-batch", {"requests": []}),
    ("segmentations", {"output": "sketch"}),
    ("upscale", {"method": "crayon"}),
    ("speech", {"voice": "nobody"}),
    ("img2video", {"num_frames": "6"}),
    ("videos-remove-background", {"prompt": "  "}),
    ("music-generate", {"duration": "long"}),
]


@SQLITE
@pytest.mark.parametrize(("name", "changes"), BAD_INPUT, ids=[f"{n}-{'-'.join(c)}" for n, c in BAD_INPUT])
async def test_bad_input_is_the_same_400_in_a_dry_run(
    mesh: Mesh, http: aiohttp.ClientSession, name: str, changes: dict[str, Any]
) -> None:
    customer = await new_customer(mesh, "10")
    call = CALLS[name]
    dry = await send(http, mesh, call, customer.headers, dry="query", changes=changes)
    assert await reservations(mesh, customer.account_id) == []
    real = await send(http, mesh, call, customer.headers, changes=changes)
    assert dry.status == real.status == 400, (dry.raw, real.raw)
    assert dry.json() == real.json()


@SQLITE
@pytest.mark.parametrize("name", ["generations", "segmentations", "videos-remove-background"])
@pytest.mark.parametrize("value", ["maybe", "", "TRUE", "yes"])
async def test_a_dry_run_parameter_other_than_true_false_1_0_is_a_400(
    mesh: Mesh, http: aiohttp.ClientSession, name: str, value: str
) -> None:
    customer = await new_customer(mesh, "10")
    answer = await send(http, mesh, CALLS[name], customer.headers, query={"dry_run": value})
    assert answer.status == 400, answer.raw
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and "'dry_run'" in error["message"]
    assert await reservations(mesh, customer.account_id) == []


@SQLITE
@pytest.mark.parametrize("value", ["false", "0"])
async def test_dry_run_false_or_0_is_the_real_call(
    mesh: Mesh, http: aiohttp.ClientSession, value: str
) -> None:
    customer = await new_customer(mesh, "10")
    answer = await send(http, mesh, CALLS["generations"], customer.headers, query={"dry_run": value})
    assert answer.status == 200 and "data" in answer.json()
    assert await reservations(mesh, customer.account_id) == [("committed", 29)]


@SQLITE
async def test_1_is_true_and_a_repeated_parameter_is_a_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    url = mesh.url + "/v1/images/generations"
    body = CALLS["generations"].body
    async with http.post(url + "?dry_run=1", json=body, headers=customer.headers) as response:
        assert response.status == 200 and (await response.json())["object"] == "price_preview"
    async with http.post(
        url + "?dry_run=true&dry_run=false", json=body, headers=customer.headers
    ) as response:
        assert response.status == 400
        assert "more than once" in (await response.json())["error"]["message"]


@SQLITE
async def test_a_body_dry_run_must_be_a_boolean(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    call = CALLS["speech"]
    answer = await send(http, mesh, call, customer.headers, changes={"dry_run": "yes"})
    assert answer.status == 400 and "'dry_run'" in answer.json()["error"]["message"]
    batch = {"requests": [{"prompt": "a", "dry_run": True}]}  # the batch's own field, not its items'
    async with http.post(
        mesh.url + "/v1/images/generations/batch", json=batch, headers=customer.headers
    ) as response:
        assert response.status == 400
        assert "requests[0].dry_run" in (await response.json())["error"]["message"]


@SQLITE
@pytest.mark.parametrize("name", ["generations", "segmentations", "videos-remove-background", "chat"])
async def test_a_dry_run_without_a_credential_is_a_401(
    mesh: Mesh, http: aiohttp.ClientSession, name: str
) -> None:
    for headers in ({}, {"X-API-Key": "sk-unknown"}):
        answer = await send(http, mesh, CALLS[name], headers, dry="query")
        assert answer.status == 401, answer.raw
        assert answer.json()["error"]["type"] == "authentication_error"


@SQLITE
async def test_a_dry_run_claims_no_idempotency_key(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    headers = customer.headers | {"Idempotency-Key": "priced-first"}
    call = CALLS["generations"]
    assert (await send(http, mesh, call, headers, dry="field")).status == 200
    real = await send(http, mesh, call, headers)
    assert real.status == 200 and "Idempotent-Replayed" not in real.headers
    assert "data" in real.json()


@SQLITE
async def test_a_video_form_dry_run_after_the_file_is_a_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "10")
    fields = [*CALLS["videos-remove-background"].form(), ("dry_run", "true")]  # type: ignore[misc]
    async with http.post(
        mesh.url + "/v1/videos/remove-background", data=_form(fields), headers=customer.headers
    ) as response:
        assert response.status == 400
        assert "before the 'file' part" in (await response.json())["error"]["message"]
    state = await books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held) == (1000, 0)


def test_every_paid_route_documents_dry_run_and_the_price_preview() -> None:
    from edge.routes import ROUTES, openapi_document

    document = openapi_document()
    paid = [route for route in ROUTES if route.paid]
    assert {route.path for route in paid} == {call.path for call in CALLS.values()}
    for route in paid:
        operation = document["paths"][route.path][route.method.lower()]
        assert {"name": "dry_run", "in": "query"}.items() <= operation["parameters"][-1].items()
        assert "PricePreview" in json.dumps(operation["responses"]["200"]["content"]["application/json"])
        for content in operation["requestBody"]["content"].values():
            name = content["schema"]["$ref"].rsplit("/", 1)[1]
            assert "dry_run" in document["components"]["schemas"][name]["properties"], name
