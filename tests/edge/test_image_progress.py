"""POST /v1/images/generations with Accept: text/event-stream: a progress event per step, then
the images as the `result` event."""

from __future__ import annotations

import json

import aiohttp

from tests.conftest import Mesh, new_customer


async def test_a_generation_streams_its_steps_then_the_images(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    body = {"model": "z-image-turbo", "prompt": "a kiln", "size": "256x256", "num_inference_steps": 3}
    headers = customer.headers | {"Accept": "text/event-stream"}
    async with http.post(mesh.url + "/v1/images/generations", json=body, headers=headers) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        text = (await response.read()).decode()
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
        for block in text.strip().split("\n\n")
    ]
    assert [data for kind, data in events if kind == "progress"] == [
        {"step": step, "total_steps": 3} for step in (1, 2, 3)
    ]
    kind, result = events[-1]
    assert kind == "result" and result["data"][0]["url"] and result["timing"]["total_ms"] > 0
