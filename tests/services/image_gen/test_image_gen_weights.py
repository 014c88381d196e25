"""Real-weights path: a saved pipeline directory named in the registry loads through the same loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from kiln.image.v1 import image_service_pb2 as pb
from services.common.media.image import encode_image
from services.common.model_cache import tiny_model_directory
from services.common.registry import load_registry
from services.common.runner import Progress
from services.image_gen.engines import ImageRequest, ImageResult, build_engine_pool
from services.image_gen.tiny import TINY_VERSION

from .conftest import ImageGen

LOCAL_MODEL = """
[[models]]
id = "z-image-local"
capability = "text-to-image"
engine = "zimage"
weights = "{weights}"

[models.limits]
max_width = 1024
max_height = 1024

[models.defaults]
steps = 8
"""


async def test_the_saved_tiny_model_loads_back_through_a_registry_weights_path(
    image_gen: ImageGen, tmp_path: Path
) -> None:
    saved = tiny_model_directory(
        image_gen.settings.resolved_model_cache_dir, "z-image-turbo", version=TINY_VERSION
    )
    assert (saved / "model_index.json").is_file()
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in saved.iterdir()
    }
    # No half-built model is left next to it.
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]

    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_MODEL.format(weights=saved))
    empty_cache = tmp_path / "cache"
    pool = build_engine_pool(load_registry(registry_path), cache_dir=empty_cache, default="z-image-local")
    await pool.load()
    engine = pool.get("z-image-local")
    assert engine.ready
    try:
        request = ImageRequest(
            prompt="a lighthouse at night",
            negative_prompt="",
            width=256,
            height=256,
            steps=3,
            guidance_scale=0.0,
            count=1,
            seed=42,
        )
        events = [event async for event in engine.run(request)]
    finally:
        await pool.close()
    assert not empty_cache.exists()  # loaded from the directory, nothing was built
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]
    result = events[-1]
    assert isinstance(result, ImageResult)
    assert result.model == "z-image-local"

    # The same weights, seed and inputs through the tiny default over gRPC: the same bytes.
    served = [
        m
        async for m in image_gen.stub.GenerateImages(
            pb.GenerateImagesRequest(
                prompt="a lighthouse at night",
                negative_prompt="",
                width=256,
                height=256,
                num_inference_steps=3,
                seed=42,
            )
        )
    ][-1].result
    digest = hashlib.sha256(result.images[0].data).hexdigest()
    assert hashlib.sha256(served.images[0].data).hexdigest() == digest


LOCAL_KLEIN = """
[[models]]
id = "klein-local"
capability = "image-edit"
extra_capabilities = ["text-to-image"]
engine = "flux2-klein"
weights = "{weights}"

[models.limits]
max_width = 1024
max_height = 1024

[models.defaults]
steps = 50
guidance_scale = 4.0
"""


async def test_a_saved_klein_model_loads_back_with_its_own_variant(
    image_gen: ImageGen, tmp_path: Path
) -> None:
    """The distilled tiny build served from a weights directory stays distilled (the checkpoint decides)."""
    saved = tiny_model_directory(
        image_gen.settings.resolved_model_cache_dir, "black-forest-labs/FLUX.2-klein-4B", version=TINY_VERSION
    )
    assert saved.name.startswith("black-forest-labs_FLUX.2-klein-4B-")  # a safe directory name
    assert (saved / "model_index.json").is_file()
    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_KLEIN.format(weights=saved))
    empty_cache = tmp_path / "cache"
    pool = build_engine_pool(load_registry(registry_path), cache_dir=empty_cache, default="klein-local")
    await pool.load()
    engine = pool.get("klein-local")
    try:
        assert engine.pipe.config.is_distilled is True  # type: ignore[attr-defined]
        source = Image.new("RGB", (64, 64), (200, 30, 30))
        request = ImageRequest(
            prompt="make it blue",
            negative_prompt="",
            width=64,
            height=64,
            steps=2,
            guidance_scale=1.0,
            count=1,
            seed=5,
            inputs=(source,),
        )
        events = [event async for event in engine.run(request)]
    finally:
        await pool.close()
    assert not empty_cache.exists()
    result = events[-1]
    assert isinstance(result, ImageResult)
    served = [
        m
        async for m in image_gen.stub.EditImages(
            pb.EditImagesRequest(
                prompt="make it blue",
                negative_prompt="",
                input_images=[encode_image(source)],
                num_inference_steps=2,
                guidance_scale=1.0,
                seed=5,
            )
        )
    ][-1].result
    assert served.images[0].data == result.images[0].data
