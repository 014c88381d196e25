"""SegmentImage and RemoveImageBackground over real gRPC, and the SAM3 engine directly."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from kiln.segmentation.v1 import segmentation_service_pb2 as pb
from services.segmentation.engines import PointPrompt, SegmentRequest
from services.segmentation.servicer import SERVICE_NAME
from tests.services.grpc_errors import expect_invalid

from .conftest import Seg
from .media_util import object_image, png_bytes

WIDTH, HEIGHT = 203, 151


def open_png(image: Any) -> Image.Image:
    assert image.mime_type == "image/png"
    picture = Image.open(io.BytesIO(image.data), formats=["PNG"])
    picture.load()
    assert (picture.width, picture.height) == (image.width, image.height)
    return picture


async def test_health_turns_serving_once_sam3_loads_and_reflection_lists_the_service(seg: Seg) -> None:
    assert seg.status_before_load == health_pb2.HealthCheckResponse.NOT_SERVING
    now = await seg.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert now.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(seg.channel)
    replies = [
        r
        async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE_NAME in names


async def test_text_segmentation_returns_a_mask_of_the_original_size(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    engine = seg.engine()
    direct = await engine.result(SegmentRequest(image, "a yellow ball"))
    assert len(direct.masks) == 1
    assert direct.masks[0].pixels.shape == (HEIGHT, WIDTH)

    response = await seg.stub.SegmentImage(
        pb.SegmentImageRequest(
            image=png_bytes(image), prompt="a yellow ball", output=pb.SEGMENTATION_OUTPUT_MASK
        )
    )
    assert response.model == "sam3"
    assert len(response.masks) == 1
    assert response.found == direct.found
    mask = open_png(response.masks[0].image)
    assert mask.mode == "L" and mask.size == (WIDTH, HEIGHT)
    grey = np.asarray(mask)
    assert set(np.unique(grey)) <= {0, 255}
    # The same model on the same pixels: the PNG is the engine's mask.
    assert np.array_equal(grey == 255, direct.masks[0].pixels)
    assert response.masks[0].coverage == pytest.approx(direct.masks[0].coverage, abs=1e-6)
    assert response.masks[0].score == pytest.approx(direct.masks[0].score, abs=1e-6)
    if direct.found:
        assert direct.masks[0].score >= engine.score_threshold


async def test_cutout_is_the_input_with_alpha_zero_outside_the_mask(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    response = await seg.stub.SegmentImage(
        pb.SegmentImageRequest(image=png_bytes(image), points=[pb.Point(x=100, y=75)])
    )
    assert response.found
    cut = open_png(response.masks[0].image)
    assert cut.mode == "RGBA" and cut.size == (WIDTH, HEIGHT)
    rgba = np.asarray(cut)
    alpha = rgba[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    inside = alpha == 255
    assert np.array_equal(rgba[..., :3][inside], np.asarray(image)[inside])
    assert response.masks[0].coverage == pytest.approx(inside.mean(), abs=1e-6)


async def test_points_with_multimask_return_three_candidates_best_first(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    response = await seg.stub.SegmentImage(
        pb.SegmentImageRequest(
            image=png_bytes(image),
            points=[pb.Point(x=100, y=75), pb.Point(x=5, y=5, foreground=False)],
            multimask_output=True,
        )
    )
    assert len(response.masks) == 3
    scores = [m.score for m in response.masks]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    pictures = [np.asarray(open_png(m.image))[..., 3] for m in response.masks]
    assert all(p.shape == (HEIGHT, WIDTH) for p in pictures)
    assert len({p.tobytes() for p in pictures}) > 1  # different candidates, not one mask thrice


async def test_prompt_and_points_refine_the_detection_or_report_not_found(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    engine = seg.engine()
    detection = engine.detect_blocking([image], "a yellow ball")[0]
    result = await engine.result(SegmentRequest(image, "a yellow ball", (PointPrompt(100, 75),)))
    if detection.found:
        refined = engine.points_blocking(image, (PointPrompt(100, 75),), box=detection.box, multimask=False)
        assert np.array_equal(result.masks[0].pixels, refined[0].pixels)
    else:
        assert not result.found and result.masks[0].empty


async def test_the_prompt_path_finds_nothing_below_the_threshold(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    engine = seg.engine()
    score = engine.detect_blocking([image], "ball")[0].score
    saved = engine.score_threshold
    engine.score_threshold = score + 1e-3  # just above this image's best detection
    try:
        result = await engine.result(SegmentRequest(image, "ball"))
    finally:
        engine.score_threshold = saved
    assert not result.found
    assert result.masks[0].empty and result.masks[0].pixels.shape == (HEIGHT, WIDTH)


async def test_remove_image_background_is_rgba_of_the_input_size(seg: Seg) -> None:
    image = object_image(WIDTH, HEIGHT)
    response = await seg.stub.RemoveImageBackground(
        pb.RemoveImageBackgroundRequest(image=png_bytes(image), prompt="the ball")
    )
    cut = open_png(response.image)
    assert cut.mode == "RGBA" and cut.size == (WIDTH, HEIGHT)
    alpha = np.asarray(cut)[..., 3]
    assert response.coverage == pytest.approx((alpha == 255).mean(), abs=1e-6)
    if response.found:
        assert alpha.max() == 255 and alpha.min() == 0
    else:
        assert alpha.max() == 0


async def test_bad_image_requests_are_invalid_argument(seg: Seg) -> None:
    image = png_bytes(object_image(WIDTH, HEIGHT))
    stub = seg.stub
    await expect_invalid(stub.SegmentImage(pb.SegmentImageRequest(image=image)), "prompt", "point")
    await expect_invalid(stub.SegmentImage(pb.SegmentImageRequest(image=image, prompt="   ")), "prompt")
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, prompt="ball", multimask_output=True)),
        "multimask_output",
    )
    await expect_invalid(
        stub.SegmentImage(
            pb.SegmentImageRequest(image=image, points=[pb.Point(x=10, y=10), pb.Point(x=WIDTH, y=10)])
        ),
        "Point 2",
        f"{WIDTH}x{HEIGHT}",
    )
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, points=[pb.Point(x=-1, y=3)])), "Point 1"
    )
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, points=[pb.Point(x=float("nan"), y=3)])),
        "Point 1",
    )
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=b"not an image", prompt="x")), "image"
    )
    await expect_invalid(stub.SegmentImage(pb.SegmentImageRequest(image=image[:200], prompt="x")), "image")
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, prompt="x", model="dall-e-3")), "dall-e-3"
    )
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, prompt="x", output=7)),  # type: ignore[arg-type]
        "output",
    )
    await expect_invalid(
        stub.SegmentImage(pb.SegmentImageRequest(image=image, prompt="x", model="sam3-limited")), "48x48"
    )
    await expect_invalid(stub.RemoveImageBackground(pb.RemoveImageBackgroundRequest(image=image)), "prompt")
