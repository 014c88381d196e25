"""POST /v1/images/img2video and GET /v1/images/user-videos through the edge (tiny Wan image-to-video)."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import av
import pytest
from PIL import Image

from tests.conftest import Customer, Mesh, balance, new_customer

IMG2VIDEO = "/v1/images/img2video"
LIBRARY = "/v1/images/user-videos"
FPS = 16
#: The contract's price of image-to-video for a non-premium account, stated apart from the
#: code under test: "Credit Cost — Non-premium: 1 credit per request | Premium: Free"
#: (registry: turbodiffusion-wan2.2-i2v, base "1", reference_steps 0). 100 units = 1 credit.
PRICE_UNITS = 100
PRICE_CREDITS = "1"


def png(width: int = 208, height: int = 120, colour: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def form(image: bytes | None = None, **fields: Any) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("image", png() if image is None else image, filename="input.png", content_type="image/png")
    values = {
        "prompt": "a slow pan",
        "num_frames": 5,
        "num_steps": 2,
        "resolution": "480p",
        "use_ode": "true",
    }
    values.update(fields)
    for name, value in values.items():
        data.add_field(name, str(value))
    return data


async def generate(
    http: aiohttp.ClientSession, mesh: Mesh, customer: Customer, **fields: Any
) -> dict[str, Any]:
    async with http.post(mesh.url + IMG2VIDEO, data=form(**fields), headers=customer.headers) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def charged_for(
    http: aiohttp.ClientSession, mesh: Mesh, customer: Customer, **fields: Any
) -> tuple[int, dict[str, Any]]:
    """(units the balance dropped by, the answer) for one video."""
    before = await balance(mesh, customer.account_id)
    video = await generate(http, mesh, customer, **fields)
    return before - await balance(mesh, customer.account_id), video


async def fetch(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
        return await response.read()


def probe(data: bytes) -> tuple[int, float, int, int, str]:
    """(frames, fps, width, height, pixel format) as PyAV decodes the MP4."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return (
            len(frames),
            float(stream.average_rate or 0),
            frames[0].width,
            frames[0].height,
            frames[0].format.name,
        )


async def test_img2video_stores_an_mp4_with_the_requested_frames(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    video = await generate(http, mesh, customer, seed=3)
    assert video["object"] == "video" and video["num_frames"] == 5 and video["fps"] == FPS
    assert (video["width"], video["height"]) == (832, 480)  # 480p with the input's aspect (832:480)
    assert video["duration"] == pytest.approx(5 / FPS) and video["seed"] == 3 and video["use_ode"] is True
    assert {"inference_ms", "encode_ms", "total_ms"} <= set(video["timing"])
    data = await fetch(http, video["url"])
    assert len(data) == video["size_bytes"]
    assert probe(data) == (5, FPS, 832, 480, "yuv420p")


@pytest.mark.parametrize(
    "fields",
    [{"num_frames": 5, "num_steps": 2}, {"num_frames": 9, "num_steps": 3}],
    ids=["5-frames-2-steps", "9-frames-3-steps"],
)
async def test_img2video_costs_the_contract_price_whatever_the_frames_and_steps(
    mesh: Mesh, http: aiohttp.ClientSession, fields: dict[str, Any]
) -> None:
    customer = await new_customer(mesh, "5")
    charged, video = await charged_for(http, mesh, customer, seed=4, **fields)
    assert charged == PRICE_UNITS
    assert video["credits_charged"] == PRICE_CREDITS


async def test_img2video_is_free_for_premium_accounts(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5", premium=True)
    charged, video = await charged_for(http, mesh, customer, seed=5)
    assert charged == 0
    assert video["credits_charged"] == "0"


async def test_same_seed_with_ode_gives_the_same_bytes(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    first = await generate(http, mesh, customer, seed=11, image=png(120, 208))
    second = await generate(http, mesh, customer, seed=11, image=png(120, 208))
    other = await generate(http, mesh, customer, seed=12, image=png(120, 208))
    assert (first["width"], first["height"]) == (480, 832)  # portrait input, portrait video
    same = await fetch(http, first["url"])
    assert await fetch(http, second["url"]) == same and await fetch(http, other["url"]) != same


async def test_the_library_lists_only_the_callers_videos_and_pages_cover_each_once(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    alice, bob = await new_customer(mesh, "10"), await new_customer(mesh, "10")
    made = [(await generate(http, mesh, alice, seed=i, prompt=f"clip {i}"))["id"] for i in range(3)]
    bobs = (await generate(http, mesh, bob, seed=9))["id"]

    async def page(customer: Customer, **params: Any) -> dict[str, Any]:
        async with http.get(mesh.url + LIBRARY, params=params, headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())

    newest = await page(alice, limit=20, offset=0, sortBy="newest", sortOrder="desc")
    assert newest["total"] == 3 and [v["id"] for v in newest["data"]] == made[::-1]
    assert newest["data"][0]["prompt"] == "clip 2" and newest["data"][0]["num_frames"] == 5
    assert bobs not in {v["id"] for v in newest["data"]}
    assert [v["id"] for v in (await page(bob))["data"]] == [bobs]
    oldest = await page(alice, sortBy="oldest")
    assert [v["id"] for v in oldest["data"]] == made
    seen: list[str] = []
    for offset in range(0, 4, 2):
        chunk = await page(alice, limit=2, offset=offset)
        assert chunk["total"] == 3 and chunk["has_more"] == (offset == 0)
        seen += [v["id"] for v in chunk["data"]]
    assert sorted(seen) == sorted(made) and len(seen) == 3
    assert (await page(alice, sortBy="frames", sortOrder="asc"))["total"] == 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": 0}, "'limit' must be between 1 and 100"),
        ({"limit": "many"}, "not an integer"),
        ({"offset": -1}, "must not be negative"),
        ({"sortBy": "prompt"}, "Invalid value for 'sortBy'"),
        ({"sortOrder": "up"}, "Invalid value for 'sortOrder'"),
    ],
)
async def test_bad_library_parameters_are_400s(
    mesh: Mesh, http: aiohttp.ClientSession, params: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "0")
    async with http.get(mesh.url + LIBRARY, params=params, headers=customer.headers) as response:
        assert response.status == 400
        assert message in (await response.json())["error"]["message"]


async def test_the_library_needs_a_key(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    async with http.get(mesh.url + LIBRARY) as response:
        assert response.status == 401


@pytest.mark.parametrize(
    ("image", "fields", "message"),
    [
        (b"GIF89a but not really an image", {}, "image"),
        (None, {"num_frames": 0}, "num_frames"),
        (None, {"num_frames": 100000}, "num_frames"),
        (None, {"resolution": "8K"}, "resolution"),
        (png(1100, 1000), {}, "pixels"),
    ],
)
async def test_bad_input_is_a_free_400(
    mesh: Mesh, http: aiohttp.ClientSession, image: bytes | None, fields: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    before = await balance(mesh, customer.account_id)
    async with http.post(
        mesh.url + IMG2VIDEO, data=form(image, **fields), headers=customer.headers
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    assert await balance(mesh, customer.account_id) == before


async def test_a_client_that_disconnects_is_not_charged(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    before = await balance(mesh, customer.account_id)
    request = asyncio.ensure_future(
        http.post(
            mesh.url + IMG2VIDEO,
            data=form(num_frames=81, num_steps=8),
            headers=customer.headers,
        )
    )
    ledger: Any = mesh.ledger
    async with asyncio.timeout(60):  # wait until the work is under way (credits held)
        while True:
            if (await ledger.get_account(customer.account_id)).held:
                break
            await asyncio.sleep(0.05)
    request.cancel()  # the client goes away mid-generation
    with pytest.raises(asyncio.CancelledError):
        await request
    async with asyncio.timeout(60):  # the edge notices, cancels the job and releases the hold
        while True:
            if not (await ledger.get_account(customer.account_id)).held:
                break
            await asyncio.sleep(0.05)
    assert await balance(mesh, customer.account_id) == before
    async with http.get(mesh.url + LIBRARY, headers=customer.headers) as response:
        assert (await response.json())["total"] == 0


def server_sent_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


async def test_progress_streams_as_server_sent_events(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    before = await balance(mesh, customer.account_id)
    headers = {**customer.headers, "Accept": "text/event-stream"}
    async with http.post(mesh.url + IMG2VIDEO, data=form(seed=2, num_steps=3), headers=headers) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        events = server_sent_events(await response.text())
    assert [(name, data["step"]) for name, data in events[:-1]] == [
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
    ]
    assert all(data["total_steps"] == 3 for _, data in events[:-1])
    name, result = events[-1]
    assert name == "result" and result["num_frames"] == 5 and result["credits_charged"] == PRICE_CREDITS
    assert probe(await fetch(http, result["url"]))[0] == 5
    assert before - await balance(mesh, customer.account_id) == PRICE_UNITS


async def test_bad_input_with_server_sent_events_is_still_a_plain_400(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    before = await balance(mesh, customer.account_id)
    headers = {**customer.headers, "Accept": "text/event-stream"}
    async with http.post(mesh.url + IMG2VIDEO, data=form(num_frames=10), headers=headers) as response:
        assert response.status == 400 and response.content_type == "application/json"
        assert "num_frames" in (await response.json())["error"]["message"]
    assert await balance(mesh, customer.account_id) == before
