"""image_gen over real gRPC: streaming generation, determinism, errors, cancellation, health, reflection."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from kiln.image.v1 import image_service_pb2 as pb
from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.image_gen.servicer import SERVICE_NAME
from tests.services.grpc_errors import assert_invalid_request

from .conftest import MISSING_MODEL, ImageGen

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def generate(stub: pb_grpc.ImageServiceStub, **fields: Any) -> list[pb.GenerateImagesResponse]:
    """Every message of one GenerateImages stream."""
    return [message async for message in stub.GenerateImages(pb.GenerateImagesRequest(**fields))]


async def result_of(stub: pb_grpc.ImageServiceStub, **fields: Any) -> pb.GeneratedImages:
    messages = await generate(stub, **fields)
    assert messages[-1].WhichOneof("event") == "result"
    return messages[-1].result


def decode_png(image: Any) -> Image.Image:
    assert image.mime_type == "image/png"
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(image.data), formats=["PNG"])
    picture.load()
    return picture


async def test_health_is_not_serving_until_the_default_model_loads(image_gen: ImageGen) -> None:
    assert image_gen.status_before_load == NOT_SERVING
    assert image_gen.status_after_load == SERVING
    overall = await image_gen.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == SERVING


async def test_generation_streams_each_step_then_png_images(image_gen: ImageGen) -> None:
    messages = await generate(
        image_gen.stub,
        prompt="a red fox in the snow",
        width=256,
        height=256,
        num_inference_steps=4,
        count=2,
        seed=7,
    )
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["progress"] * 4 + ["result"]
    assert [(m.progress.step, m.progress.total_steps) for m in messages[:4]] == [(i, 4) for i in range(1, 5)]
    result = messages[-1].result
    assert result.model == "z-image-turbo"
    assert result.seed == 7
    assert result.num_inference_steps == 4
    assert result.timing.inference_ms > 0
    assert result.timing.encode_ms > 0
    assert result.timing.queue_ms >= 0
    assert len(result.images) == 2
    pixels = []
    for image in result.images:
        assert (image.width, image.height) == (256, 256)
        picture = decode_png(image)
        assert picture.size == (256, 256)
        array = np.asarray(picture.convert("RGB"), dtype=np.float32)
        assert array.std() > 1.0  # a real decoded image, not a flat colour
        pixels.append(array)
    assert not np.array_equal(pixels[0], pixels[1])  # two samples of one batch differ


async def test_defaults_and_aliases_come_from_the_registry(image_gen: ImageGen) -> None:
    messages = await generate(
        image_gen.stub, model="dall-e-3", prompt="a lighthouse", width=256, height=256, seed=3
    )
    result = messages[-1].result
    assert result.model == "z-image-turbo"
    assert result.num_inference_steps == 8  # the registry's default
    assert len(result.images) == 1  # count 0 means 1
    assert [m.progress.step for m in messages[:-1]] == list(range(1, 9))


async def test_same_seed_gives_identical_bytes_and_other_seeds_differ(image_gen: ImageGen) -> None:
    request = {"prompt": "a bowl of fruit", "width": 256, "height": 256, "num_inference_steps": 3}
    first = await result_of(image_gen.stub, seed=1234, **request)
    again = await result_of(image_gen.stub, seed=1234, **request)
    other = await result_of(image_gen.stub, seed=1235, **request)
    assert first.images[0].data == again.images[0].data
    assert first.images[0].data != other.images[0].data


async def test_an_unset_seed_is_drawn_returned_and_reproducible(image_gen: ImageGen) -> None:
    request = {"prompt": "a quiet harbour", "width": 256, "height": 256, "num_inference_steps": 2}
    drawn = await result_of(image_gen.stub, **request)
    second = await result_of(image_gen.stub, **request)
    assert drawn.seed != second.seed  # two independent draws from 2**63 values
    replay = await result_of(image_gen.stub, seed=drawn.seed, **request)
    assert replay.images[0].data == drawn.images[0].data


async def test_longcat_generates_through_its_own_pipeline(image_gen: ImageGen) -> None:
    messages = await generate(
        image_gen.stub,
        model="longcat-image-edit",
        prompt="a wide desert at dawn",
        width=512,
        height=256,
        num_inference_steps=2,
        seed=5,
    )
    assert [(m.progress.step, m.progress.total_steps) for m in messages[:-1]] == [(1, 2), (2, 2)]
    result = messages[-1].result
    assert result.model == "longcat-image-edit"
    picture = decode_png(result.images[0])
    assert picture.size == (512, 256)
    assert np.asarray(picture, dtype=np.float32).std() > 1.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"model": "no-such-model", "prompt": "x", "width": 256, "height": 256},
            "Invalid model ID 'no-such-model'. Supported models: z-image-turbo, longcat-image-edit, "
            "black-forest-labs/FLUX.2-klein-4B, black-forest-labs/FLUX.2-klein-base-4B, z-image-missing",
        ),
        ({"prompt": "", "width": 256, "height": 256}, "'prompt' is required and must not be empty"),
        ({"prompt": "   ", "width": 256, "height": 256}, "'prompt' is required and must not be empty"),
        (
            {"model": "longcat-image-edit", "prompt": "x", "width": 1024, "height": 1792},
            "The dimensions 1024x1792 exceed the maximum allowed for the longcat-image-edit model (1792x1024)",
        ),
        (
            {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 0},
            "'num_inference_steps' must be between 1 and 50",
        ),
        (
            {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 51},
            "'num_inference_steps' must be between 1 and 50",
        ),
        (
            {"prompt": "x", "width": 256, "height": 256, "count": 5},
            "The number of images must be between 1 and 4",
        ),
        (
            {"prompt": "x", "width": 256, "height": 256, "count": -1},
            "The number of images must be between 1 and 4",
        ),
        (
            {"prompt": "x", "width": 250, "height": 256},
            "The dimensions 250x256 must be multiples of 16 for the z-image-turbo model",
        ),
        ({"prompt": "x" * 4001, "width": 256, "height": 256}, "'prompt' is longer than 4000 characters"),
    ],
    ids=[
        "unknown-model",
        "empty-prompt",
        "blank-prompt",
        "too-large",
        "steps-0",
        "steps-51",
        "count-5",
        "count-negative",
        "not-multiple-of-16",
        "prompt-too-long",
    ],
)
async def test_invalid_requests_fail_with_invalid_argument(
    image_gen: ImageGen, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(image_gen.stub, **fields)
    assert_invalid_request(info.value, message)


async def test_a_model_that_cannot_load_is_reported_not_faked(image_gen: ImageGen) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(image_gen.stub, model=MISSING_MODEL, prompt="x", width=256, height=256)
    error = assert_invalid_request(info.value)
    assert error.message.startswith(f"Model '{MISSING_MODEL}' is not available on this server: ")
    assert "no-such-weights" in error.message


def _big_request(request_id: str) -> pb.GenerateImagesRequest:
    return pb.GenerateImagesRequest(
        prompt="a very slow cathedral",
        width=1024,
        height=1024,
        num_inference_steps=50,
        seed=9,
        request_id=request_id,
    )


def _report(image_gen: ImageGen, request_id: str) -> Any:
    reports = [r for r in image_gen.pool.engines["z-image-turbo"].runner.reports if r.key == request_id]
    assert len(reports) == 1
    return reports[0]


async def test_cancelling_the_call_stops_the_pipeline_and_frees_the_engine(image_gen: ImageGen) -> None:
    call = image_gen.stub.GenerateImages(_big_request("cancel-me"))
    first = await call.read()
    assert (first.progress.step, first.progress.total_steps) == (1, 50)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    # The engine runs one job at a time: this is served only once the cancelled job let go.
    after = await result_of(
        image_gen.stub, prompt="next", width=256, height=256, num_inference_steps=2, seed=1
    )
    assert len(after.images) == 1
    report = _report(image_gen, "cancel-me")
    assert report.outcome == "cancelled"
    assert 1 <= report.steps_done < 50


async def test_a_passed_deadline_stops_the_pipeline(image_gen: ImageGen) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in image_gen.stub.GenerateImages(_big_request("deadline"), timeout=1.0):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await result_of(image_gen.stub, prompt="next", width=256, height=256, num_inference_steps=2, seed=1)
    report = _report(image_gen, "deadline")
    assert report.outcome == "cancelled"
    assert report.steps_done < 50


async def test_health_answers_serving_while_a_generation_runs(image_gen: ImageGen) -> None:
    call = image_gen.stub.GenerateImages(_big_request("health-probe"))
    try:
        first = await call.read()
        assert first.progress.step == 1
        response = await image_gen.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert response.status == SERVING
        second = await call.read()  # the generation was still running while health answered
        assert second.progress.step == 2
    finally:
        call.cancel()
    await result_of(image_gen.stub, prompt="next", width=256, height=256, num_inference_steps=2, seed=1)
    assert _report(image_gen, "health-probe").steps_done < 50


async def test_list_models_reports_limits_defaults_and_readiness(image_gen: ImageGen) -> None:
    response = await image_gen.stub.ListModels(pb.ListModelsRequest())
    models = {m.id: m for m in response.models}
    assert list(models) == [
        "z-image-turbo",
        "longcat-image-edit",
        "black-forest-labs/FLUX.2-klein-4B",
        "black-forest-labs/FLUX.2-klein-base-4B",
        MISSING_MODEL,
    ]
    turbo = models["z-image-turbo"]
    assert list(turbo.capabilities) == ["text-to-image"]
    assert "dall-e-3" in turbo.aliases
    assert (turbo.max_width, turbo.max_height, turbo.default_steps) == (1792, 1792, 8)
    assert turbo.ready and turbo.unavailable_reason == ""
    longcat = models["longcat-image-edit"]
    assert (longcat.max_width, longcat.max_height, longcat.default_guidance_scale) == (1792, 1024, 4.5)
    assert longcat.ready
    assert list(longcat.capabilities) == ["text-to-image", "image-edit"]
    for klein_id, steps, guidance in (
        ("black-forest-labs/FLUX.2-klein-4B", 4, 1.0),
        ("black-forest-labs/FLUX.2-klein-base-4B", 50, 4.0),
    ):
        klein = models[klein_id]
        assert klein.ready and klein.unavailable_reason == ""
        assert list(klein.capabilities) == ["image-edit", "text-to-image"]
        assert (klein.max_width, klein.max_height) == (2048, 2048)
        assert (klein.default_steps, klein.default_guidance_scale) == (steps, guidance)
    missing = models[MISSING_MODEL]
    assert not missing.ready
    assert "no-such-weights" in missing.unavailable_reason


async def test_reflection_lists_the_image_service(image_gen: ImageGen) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(image_gen.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names: set[str] = set()
    async for response in call:
        names.update(s.name for s in response.list_services_response.service)
    assert SERVICE_NAME == "kiln.image.v1.ImageService"
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
