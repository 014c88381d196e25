"""Segmentation and background removal through the edge, with real media made in the test."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Mesh, balance, new_customer
from tests.edge.media_util import audio_only_file, decode_vp9_alpha, moving_square_video, object_png


def form(
    fields: dict[str, Any], *, filename: str = "input.png", content_type: str = "image/png"
) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, bytes):
            data.add_field(name, value, filename=filename, content_type=content_type)
        else:
            data.add_field(name, value)
    return data


async def test_a_text_prompt_segments_to_a_cutout_of_the_input_size(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    fields = {"file": object_png(160, 120), "prompt": "the red disc"}
    async with http.post(
        mesh.url + "/v1/images/segmentations", data=form(fields), headers=customer.headers
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "image/png"
        assert 'filename="segmented_image.png"' in response.headers["Content-Disposition"]
        assert response.headers["X-Credits-Charged"] == "0.25"
        assert response.headers["X-Segmentation-Found"] in ("true", "false")
        image = Image.open(io.BytesIO(await response.read()))
    assert image.size == (160, 120) and image.mode == "RGBA"
    assert await balance(mesh, customer.account_id) == 475


async def test_points_with_multimask_give_candidates_as_json_and_masks_as_grey(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    fields = {
        "file": object_png(160, 120),
        "point_coords": "[[80, 60], [5, 5]]",
        "point_labels": "[1, 0]",
        "multimask_output": "true",
        "output": "mask",
    }
    headers = {**customer.headers, "Accept": "application/json"}
    async with http.post(
        mesh.url + "/v1/images/segmentations", data=form(fields), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        payload = await response.json()
    candidates = payload["data"]
    assert 1 <= len(candidates) <= 3
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    import base64

    mask = Image.open(io.BytesIO(base64.b64decode(candidates[0]["b64_json"])))
    assert mask.size == (160, 120) and mask.mode == "L"
    async with http.get(mesh.url + candidates[0]["url"]) as media:
        assert media.status == 200


async def test_background_removal_keeps_the_size_and_adds_alpha(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "5")
    fields = {"file": object_png(200, 100), "prompt": "red disc"}
    async with http.post(
        mesh.url + "/v1/images/remove-background", data=form(fields), headers=customer.headers
    ) as response:
        assert response.status == 200, await response.text()
        assert 'filename="background_removed.png"' in response.headers["Content-Disposition"]
        image = Image.open(io.BytesIO(await response.read()))
    assert image.size == (200, 100) and image.mode == "RGBA"
    assert await balance(mesh, customer.account_id) == 475


async def test_video_background_removal_streams_a_vp9_alpha_webm_and_charges_found_frames(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    video = moving_square_video(frames=12, rate=12)
    fields = {"prompt": "the blue square", "file": video}
    data = form(fields, filename="clip.mp4", content_type="video/mp4")
    async with http.post(
        mesh.url + "/v1/videos/remove-background", data=data, headers=customer.headers
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "video/webm"
        assert 'filename="background_removed_video.webm"' in response.headers["Content-Disposition"]
        processed = int(response.headers["X-Frames-Processed"])
        charged_frames = int(response.headers["X-Frames-Charged"])
        charged = response.headers["X-Credits-Charged"]
        output = await response.read()
    frames, rate = decode_vp9_alpha(output)
    assert processed == 12 and len(frames) == 12 and rate == pytest.approx(12)
    assert frames[0].shape == (96, 128, 4)
    assert not all(np.all(frame[..., 3] == 255) for frame in frames)
    assert 0 <= charged_frames <= 12
    assert await balance(mesh, customer.account_id) == 1000 - 25 * charged_frames
    assert charged == f"{0.25 * charged_frames:g}"


BAD_IMAGE_FORMS = [
    ({"file": b"not an image", "prompt": "x"}, "not a supported image"),
    (
        {"file": object_png(), "point_coords": "[[500, 10]]"},
        "point_coords[0] (500, 10) is outside the 160x120 image",
    ),
    (
        {"file": object_png(), "point_coords": "[[10, 10], [20, 20]]", "point_labels": "[1]"},
        "one label per point",
    ),
    (
        {"file": object_png(), "point_coords": "[[10, 10]]", "point_labels": "[2]"},
        "must be 1 (foreground) or 0",
    ),
    ({"file": object_png(), "point_coords": "[[10, 10"}, "'point_coords' is not valid JSON"),
    ({"file": object_png(), "point_coords": "[[10]]"}, "must be an [x, y] pair"),
    ({"file": object_png()}, "Give 'prompt' (what to segment) or 'point_coords'"),
    ({"file": object_png(), "prompt": "x", "multimask_output": "true"}, "works with 'point_coords' only"),
    (
        {"file": object_png(), "prompt": "x", "multimask_output": "perhaps"},
        "Invalid value for 'multimask_output'",
    ),
    (
        {"file": object_png(), "prompt": "x", "colour": "red"},
        "Unrecognized request argument supplied: colour",
    ),
    ({"prompt": "x"}, "Missing required parameter: 'file'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_IMAGE_FORMS, ids=[m[:30] for _, m in BAD_IMAGE_FORMS])
async def test_bad_segmentation_forms_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, fields: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5")
    async with http.post(
        mesh.url + "/v1/images/segmentations", data=form(fields), headers=customer.headers
    ) as response:
        payload = await response.json()
        assert response.status == 400, payload
    assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500


def _truncated_mp4() -> bytes:
    video = moving_square_video(frames=12)
    return video[: len(video) // 3]


BAD_VIDEOS = [
    (lambda: b"\x00garbage" * 100, "video"),
    (_truncated_mp4, "video"),
    (audio_only_file, "no video stream"),
]


@pytest.mark.parametrize(("make", "message"), BAD_VIDEOS, ids=["garbage", "truncated", "audio-only"])
async def test_bad_videos_are_400_and_free(
    mesh: Mesh, http: aiohttp.ClientSession, make: Any, message: str
) -> None:
    customer = await new_customer(mesh, "5")
    data = form({"prompt": "x", "file": make()}, filename="clip.mp4", content_type="video/mp4")
    async with http.post(
        mesh.url + "/v1/videos/remove-background", data=data, headers=customer.headers
    ) as response:
        payload = await response.json()
        assert response.status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    assert message in payload["error"]["message"].lower()
    assert await balance(mesh, customer.account_id) == 500


async def test_a_video_without_a_prompt_or_file_is_400(mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "5")
    for fields, message in (
        ({"file": moving_square_video(frames=4)}, "'prompt'"),
        ({"prompt": "x"}, "'file'"),
    ):
        data = form(fields, filename="clip.mp4", content_type="video/mp4")
        async with http.post(
            mesh.url + "/v1/videos/remove-background", data=data, headers=customer.headers
        ) as response:
            payload = await response.json()
            assert response.status == 400, payload
        assert message in payload["error"]["message"]
    assert await balance(mesh, customer.account_id) == 500
