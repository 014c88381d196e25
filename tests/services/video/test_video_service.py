"""VideoService over real gRPC: the MP4, sizes per tier, determinism, progress, cancellation,
bad input, health and the model list."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from kiln.video.v1 import video_service_pb2 as pb
from services.common.registry import DEFAULT_VIDEO_MODEL
from services.video.servicer import SERVICE_NAME
from tests.services.grpc_errors import expect_invalid
from tests.services.upscale.util import png

from .conftest import MAX_PIXELS, Outcome, Video, decode_mp4, first_frame

#: The cheap request most tests share: 480p, 5 frames (two latent frames), 4 steps.
SMALL: dict[str, Any] = {"num_frames": 5, "resolution": "480p", "use_ode": True, "seed": 7}


@pytest.fixture(scope="session")
async def ode_480p(video: Video) -> Outcome:
    """One deterministic 480p generation, shared by the tests that only read it."""
    return await video.generate(**SMALL, request_id="ode-480p")


async def test_the_mp4_decodes_to_num_frames_at_16_fps_and_the_480p_size(ode_480p: Outcome) -> None:
    decoded = decode_mp4(ode_480p.mp4)
    assert (decoded.frames, decoded.fps, decoded.width, decoded.height) == (5, 16.0, 832, 480)
    assert (decoded.codec, decoded.pix_fmt) == ("h264", "yuv420p")
    # moov before mdat: browsers start playing before the whole file arrived.
    assert ode_480p.mp4[4:8] == b"ftyp"
    assert 0 < ode_480p.mp4.find(b"moov") < ode_480p.mp4.find(b"mdat")
    summary = ode_480p.summary
    assert summary.mime_type == "video/mp4"
    assert summary.size_bytes == len(ode_480p.mp4)
    assert summary.sha256 == hashlib.sha256(ode_480p.mp4).hexdigest()
    assert (summary.num_frames, summary.fps, summary.width, summary.height) == (5, 16.0, 832, 480)
    assert summary.duration_seconds == pytest.approx(5 / 16)
    assert (summary.seed, summary.model, summary.num_steps) == (7, DEFAULT_VIDEO_MODEL, 4)
    assert (summary.resolution, summary.use_ode, summary.guidance_scale) == ("480p", True, 1.0)
    assert summary.timing.inference_ms > 0 and summary.timing.encode_ms > 0
    assert summary.timing.queue_ms >= 0


async def test_progress_comes_step_by_step_before_the_file_and_the_summary_last(ode_480p: Outcome) -> None:
    assert ode_480p.progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    kinds = ode_480p.kinds
    assert kinds[:4] == ["progress"] * 4
    assert set(kinds[4:-1]) == {"mp4_chunk"}
    assert kinds[-1] == "summary"


async def test_the_same_seed_with_use_ode_gives_the_same_bytes_and_another_seed_does_not(
    video: Video, ode_480p: Outcome
) -> None:
    again = await video.generate(**SMALL)
    assert again.mp4 == ode_480p.mp4
    other = await video.generate(**{**SMALL, "seed": 8})
    assert other.mp4 != ode_480p.mp4
    assert decode_mp4(other.mp4).frames == 5


async def test_the_stochastic_sampler_is_another_video_of_the_same_shape(
    video: Video, ode_480p: Outcome
) -> None:
    stochastic = await video.generate(**{**SMALL, "use_ode": False})
    assert stochastic.summary.use_ode is False
    assert stochastic.mp4 != ode_480p.mp4
    assert decode_mp4(stochastic.mp4) == decode_mp4(ode_480p.mp4)


async def test_720p_keeps_a_portrait_image_upright(video: Video) -> None:
    portrait = await video.generate(
        image=first_frame(90, 160), num_frames=5, num_steps=2, resolution="720P", use_ode=True, seed=3
    )
    decoded = decode_mp4(portrait.mp4)
    assert (decoded.frames, decoded.fps, decoded.width, decoded.height) == (5, 16.0, 720, 1280)
    summary = portrait.summary
    assert (summary.width, summary.height, summary.resolution) == (720, 1280, "720p")
    assert portrait.progress == [(1, 2), (2, 2)]


async def test_cancelling_the_call_stops_the_job_and_frees_the_engine(video: Video) -> None:
    call = video.stub.GenerateVideo(
        pb.GenerateVideoRequest(
            prompt="a slow pan", image=first_frame(), num_frames=9, num_steps=8, request_id="cancel-me"
        )
    )
    first = await call.read()
    assert (first.progress.step, first.progress.total_steps) == (1, 8)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    # The engine runs one job at a time: this is served only once the cancelled job let go.
    async with asyncio.timeout(60):
        after = await video.generate(num_frames=5, num_steps=1, seed=1)
    assert after.summary.num_frames == 5
    assert not video.pool.engines[DEFAULT_VIDEO_MODEL].runner.running
    [report] = video.reports("cancel-me")
    assert report.outcome == "cancelled"
    assert 1 <= report.steps_done < 8


async def _drain(stream: AsyncIterable[Any]) -> None:
    async for _ in stream:
        pass


def _too_many_pixels() -> bytes:
    return png(Image.new("RGB", (1025, 1024), (10, 20, 30)))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"image": b"this is not an image"}, ("'image'", "not a supported image")),
        ({"image": b""}, ("'image' is required",)),
        ({"num_frames": 0}, ("num_frames", "4k+1", "got 0")),
        ({"num_frames": 100000}, ("num_frames", "between 5 and 81", "got 100000")),
        ({"num_frames": 10}, ("num_frames", "4k+1", "5, 9, 13, ..., 81", "got 10")),
        ({"num_steps": 0}, ("num_steps", "between 1 and 8")),
        ({"resolution": "8K"}, ("Invalid resolution '8K'", "480p, 720p, 1080p")),
        ({"prompt": "  "}, ("'prompt' is required",)),
        ({"model": "no-such-model"}, ("Invalid model ID 'no-such-model'",)),
        ({"image": first_frame(500, 100)}, ("aspect ratios up to 4:1",)),
    ],
)
async def test_bad_input_is_invalid_argument_and_runs_nothing(
    video: Video, changes: dict[str, Any], words: tuple[str, ...]
) -> None:
    runner = video.pool.engines[DEFAULT_VIDEO_MODEL].runner
    before = len(runner.reports)
    request: dict[str, Any] = {"prompt": "a wave", "image": first_frame(), "num_frames": 5, **changes}
    await expect_invalid(_drain(video.stub.GenerateVideo(pb.GenerateVideoRequest(**request))), *words)
    assert len(runner.reports) == before


async def test_an_image_over_the_pixel_limit_is_refused_before_decoding(video: Video) -> None:
    request = pb.GenerateVideoRequest(prompt="a wave", image=_too_many_pixels(), num_frames=5)
    await expect_invalid(_drain(video.stub.GenerateVideo(request)), "too large", f"{MAX_PIXELS} pixels")


async def test_health_is_serving_and_the_model_list_says_what_the_model_takes(video: Video) -> None:
    response = await video.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    listing = await video.stub.ListModels(pb.ListModelsRequest())
    [model] = listing.models
    assert model.id == DEFAULT_VIDEO_MODEL
    assert "turbodiffusion" in model.aliases
    assert list(model.resolutions) == ["480p", "720p", "1080p"]
    assert (model.max_frames, model.default_frames, model.fps) == (81, 81, 16.0)
    assert (model.max_steps, model.default_steps, model.ready) == (8, 4, True)


async def test_an_alias_names_the_same_model(video: Video) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(
            video.stub.GenerateVideo(
                pb.GenerateVideoRequest(model="TurboDiffusion", prompt="x", image=b"", num_frames=5)
            )
        )
    # Resolved (the alias is known): the refusal is about the missing image, not the model.
    assert "'image' is required" in (caught.value.details() or "")
