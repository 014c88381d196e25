"""The engine below gRPC: streaming VAE decode, real-weights path, sizing rules, the MP4 encoder."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from services.common.errors import InvalidRequest
from services.common.media.image import decode_image
from services.common.media.video import MP4_MIME_TYPE, Mp4Encoder, encode_video_mp4
from services.common.model_cache import tiny_model_directory
from services.common.registry import DEFAULT_VIDEO_MODEL, load_registry
from services.common.runner import Progress
from services.common.settings import DEFAULT_REGISTRY
from services.video.engines import (
    VideoRequest,
    VideoResult,
    WanI2VEngine,
    build_engine_pool,
    decode_latents,
)
from services.video.rules import video_params, video_size
from services.video.tiny import TINY_VERSION

from .conftest import Outcome, Video, first_frame

LOCAL_MODEL = """
[[models]]
id = "wan-i2v-local"
capability = "image-to-video"
engine = "wan_i2v"
weights = "{weights}"
options = {{ fps = 16, shift = 5.0 }}

[models.limits]
max_width = 1920
max_height = 1920
max_steps = 8
max_frames = 81

[models.defaults]
steps = 4
guidance_scale = 1.0
num_frames = 81
"""

SPEC = load_registry(DEFAULT_REGISTRY).resolve(None, "image-to-video", DEFAULT_VIDEO_MODEL)


async def test_streaming_decode_gives_exactly_what_the_vae_decodes_whole(video: Video) -> None:
    engine = video.pool.engines[DEFAULT_VIDEO_MODEL]
    assert isinstance(engine, WanI2VEngine)
    vae = engine.pipes[True].vae
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))

    def both() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.inference_mode():
            config = vae.config
            mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
            whole = vae.decode(latents * std + mean, return_dict=False)[0]
            return whole, list(decode_latents(vae, latents))

    whole, chunks = await engine.runner.call(both)  # the engine's thread: nothing else uses the VAE
    assert [chunk.shape[2] for chunk in chunks] == [1, 4, 4]  # 4k+1 frames: 1, then 4 per latent frame
    assert torch.allclose(torch.cat(chunks, dim=2), whole, atol=1e-6)


async def test_the_saved_tiny_model_loads_back_through_a_registry_weights_path(
    video: Video, tmp_path: Path
) -> None:
    saved = tiny_model_directory(
        video.settings.resolved_model_cache_dir, DEFAULT_VIDEO_MODEL, version=TINY_VERSION
    )
    assert (saved / "model_index.json").is_file()
    assert {"transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in saved.iterdir()
    }
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no half-built model

    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_MODEL.format(weights=saved))
    empty_cache = tmp_path / "cache"
    pool = build_engine_pool(load_registry(registry_path), cache_dir=empty_cache, default="wan-i2v-local")
    await pool.load()
    try:
        engine = pool.get("wan-i2v-local")
        image = decode_image(first_frame(), max_pixels=1 << 20)
        request = VideoRequest(
            image=image,
            prompt="the camera slowly pushes in",
            negative_prompt="",
            width=832,
            height=480,
            num_frames=5,
            steps=4,
            guidance_scale=1.0,
            use_ode=True,
            fps=16.0,
            seed=7,
            resolution="480p",
        )
        events = [event async for event in engine.run(request)]
    finally:
        await pool.close()
    assert not empty_cache.exists()  # loaded from the directory, nothing was built
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
    result = events[-1]
    assert isinstance(result, VideoResult)
    assert (result.model, result.num_frames, result.mime_type) == ("wan-i2v-local", 5, MP4_MIME_TYPE)

    # The same weights, seed and inputs through the tiny default over gRPC: the same bytes.
    served: Outcome = await video.generate(num_frames=5, resolution="480p", use_ode=True, seed=7)
    assert result.mp4 == served.mp4


def test_a_missing_weights_directory_makes_the_model_unavailable(tmp_path: Path) -> None:
    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_MODEL.format(weights="no-such-weights"))
    pool = build_engine_pool(load_registry(registry_path), cache_dir=tmp_path, default="wan-i2v-local")
    engine = pool.engines["wan-i2v-local"]
    with pytest.raises(Exception, match="does not hold a diffusers pipeline"):
        engine.load_blocking()


@pytest.mark.parametrize(
    ("size", "tier", "expected"),
    [
        ((832, 480), "480p", (832, 480)),
        ((1920, 1080), "480p", (832, 464)),
        ((1080, 1920), "480p", (464, 832)),
        ((1000, 1000), "480p", (480, 480)),
        ((1280, 720), "720p", (1280, 720)),
        ((90, 160), "720p", (720, 1280)),
        ((1920, 1080), "1080p", (1920, 1088)),
        ((1080, 1920), "1080P", (1088, 1920)),
        ((64, 64), "1080p", (1088, 1088)),
        ((3000, 1000), "720p", (1280, 432)),
    ],
)
def test_the_tier_is_a_box_the_image_fits_rounded_to_16(
    size: tuple[int, int], tier: str, expected: tuple[int, int]
) -> None:
    assert video_size(SPEC, size, tier) == expected


def test_defaults_and_the_frame_rule() -> None:
    params = video_params(SPEC, prompt="waves")
    assert (params.num_frames, params.steps, params.resolution, params.fps) == (81, 4, "480p", 16.0)
    assert params.duration_seconds == pytest.approx(81 / 16)
    assert params.negative_prompt == SPEC.defaults.negative_prompt
    for frames in (5, 9, 41, 81):
        assert video_params(SPEC, prompt="waves", num_frames=frames).num_frames == frames
    for frames in (0, 1, 4, 6, 80, 85, 100000, -3):
        with pytest.raises(InvalidRequest, match="4k\\+1"):
            video_params(SPEC, prompt="waves", num_frames=frames)


def _frames(width: int, height: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return [np.roll(base, 4 * i, axis=1) for i in range(count)]


def test_the_mp4_encoder_gives_the_same_bytes_for_the_same_frames() -> None:
    frames = _frames(160, 96, 9)
    files = {encode_video_mp4(iter(frames), width=160, height=96, fps=16) for _ in range(4)}
    assert len(files) == 1
    with av.open(io.BytesIO(files.pop())) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert (len(decoded), float(stream.average_rate or 0)) == (9, 16.0)
    # Lossy, but close to the input.
    error = np.abs(decoded[4].astype(int) - frames[4].astype(int)).mean()
    assert error < 12


def test_the_mp4_encoder_refuses_odd_sizes_wrong_frames_and_empty_videos() -> None:
    with pytest.raises(ValueError, match="even"):
        Mp4Encoder(161, 96, 16)
    with Mp4Encoder(160, 96, 16) as encoder:
        with pytest.raises(ValueError, match=r"\(96, 160, 3\) uint8"):
            encoder.add(np.zeros((96, 161, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="at least one frame"):
            encoder.finish()
