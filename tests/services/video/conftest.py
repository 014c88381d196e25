"""Fixtures for video: the real server in-process on 127.0.0.1:0, built once per session.

The tiny Wan 2.2 image-to-video model is built once into a session model
cache. The server's input image limit is lowered to one megapixel so the
over-the-limit test needs no large file.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from PIL import Image

from kiln.video.v1 import video_service_pb2 as pb
from kiln.video.v1 import video_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.registry import DEFAULT_VIDEO_MODEL, Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.video.engines import build_engine_pool
from services.video.server import create_service
from services.video.servicer import SERVICE_NAME
from tests.services.serving import wait_serving
from tests.services.upscale.util import png

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The server's input pixel limit in these tests.
MAX_PIXELS = 1024 * 1024


def first_frame(width: int = 208, height: int = 120) -> bytes:
    """A PNG with a gradient and a bar: an input image of the given size."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((200, 40, 30), (width // 4, height // 3, width // 2, height // 2))
    return png(image)


@dataclass
class Outcome:
    """A finished GenerateVideo stream."""

    kinds: list[str]
    progress: list[tuple[int, int]]
    mp4: bytes
    summary: pb.VideoSummary


async def collect(stream: AsyncIterable[Any]) -> Outcome:
    kinds: list[str] = []
    progress: list[tuple[int, int]] = []
    mp4 = bytearray()
    summary: pb.VideoSummary | None = None
    async for message in stream:
        kind = message.WhichOneof("event")
        kinds.append(kind)
        if kind == "progress":
            progress.append((message.progress.step, message.progress.total_steps))
        elif kind == "mp4_chunk":
            mp4 += message.mp4_chunk
        else:
            summary = message.summary
    assert summary is not None
    return Outcome(kinds, progress, bytes(mp4), summary)


@dataclass(frozen=True)
class DecodedVideo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str


def decode_mp4(data: bytes) -> DecodedVideo:
    """Decodes every frame of an MP4 with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)]
        return DecodedVideo(
            frames=len(frames),
            fps=float(stream.average_rate or 0),
            width=frames[0].width,
            height=frames[0].height,
            codec=stream.codec_context.name,
            pix_fmt=str(stream.codec_context.pix_fmt),
        )


@dataclass
class Video:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    settings: Settings
    channel: grpc.aio.Channel
    stub: pb_grpc.VideoServiceStub
    health: health_pb2_grpc.HealthStub

    async def generate(self, **kw: Any) -> Outcome:
        kw.setdefault("prompt", "the camera slowly pushes in")
        kw.setdefault("image", first_frame())
        return await collect(self.stub.GenerateVideo(pb.GenerateVideoRequest(**kw)))

    def reports(self, request_id: str) -> list[Any]:
        runner = self.pool.engines[DEFAULT_VIDEO_MODEL].runner
        return [report for report in runner.reports if report.key == request_id]


@pytest.fixture(scope="session")
def video_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-model cache of this directory's tests (the tiny model is built once)."""
    return tmp_path_factory.mktemp("video-models")


@pytest.fixture(scope="session")
async def video(tmp_path_factory: pytest.TempPathFactory, video_cache: Path) -> AsyncIterator[Video]:
    data_dir = tmp_path_factory.mktemp("video")
    settings = Settings(
        data_dir=data_dir,
        model_cache_dir=video_cache,
        registry_path=DEFAULT_REGISTRY,
        torch_threads=2,
        max_input_image_pixels=MAX_PIXELS,
    )
    registry = load_registry(DEFAULT_REGISTRY)
    pool = build_engine_pool(registry, cache_dir=video_cache, torch_threads=settings.torch_threads)
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        await wait_serving(health, SERVICE_NAME)
        yield Video(service, pool, registry, settings, channel, pb_grpc.VideoServiceStub(channel), health)
    finally:
        await channel.close()
        await service.stop(1)
