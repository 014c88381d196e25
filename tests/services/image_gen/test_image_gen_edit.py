"""image_gen over real gRPC: EditImages (FLUX.2 [klein], LongCat), masks, output formats, metadata, styles."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.image.v1 import image_service_pb2 as pb
from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.media.image import encode_image, read_image_metadata
from tests.services.grpc_errors import assert_invalid_request

from .conftest import ImageGen

KLEIN = "black-forest-labs/FLUX.2-klein-4B"
KLEIN_BASE = "black-forest-labs/FLUX.2-klein-base-4B"
LONGCAT = "longcat-image-edit"

FORMATS = [
    (media_pb2.IMAGE_FORMAT_UNSPECIFIED, "PNG", "image/png"),
    (media_pb2.IMAGE_FORMAT_PNG, "PNG", "image/png"),
    (media_pb2.IMAGE_FORMAT_JPEG, "JPEG", "image/jpeg"),
    (media_pb2.IMAGE_FORMAT_WEBP, "WEBP", "image/webp"),
]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture: smooth gradients plus seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def png(width: int, height: int, seed: int = 0) -> bytes:
    return encode_image(picture(width, height, seed), "png")


async def edit(stub: pb_grpc.ImageServiceStub, **fields: Any) -> list[pb.EditImagesResponse]:
    """Every message of one EditImages stream."""
    return [message async for message in stub.EditImages(pb.EditImagesRequest(**fields))]


async def edited(stub: pb_grpc.ImageServiceStub, **fields: Any) -> pb.GeneratedImages:
    messages = await edit(stub, **fields)
    assert [m.WhichOneof("event") for m in messages][-1] == "result"
    return messages[-1].result


async def generated(stub: pb_grpc.ImageServiceStub, **fields: Any) -> pb.GeneratedImages:
    messages = [m async for m in stub.GenerateImages(pb.GenerateImagesRequest(**fields))]
    return messages[-1].result


def opened(image: media_pb2.Image, fmt: str = "PNG") -> Image.Image:
    decoded = Image.open(io.BytesIO(image.data), formats=[fmt])
    decoded.load()
    assert decoded.size == (image.width, image.height)
    return decoded


def steps_of(messages: list[pb.EditImagesResponse]) -> list[tuple[int, int]]:
    return [
        (m.progress.step, m.progress.total_steps) for m in messages if m.WhichOneof("event") == "progress"
    ]


# --- edits ---


async def test_an_edit_of_one_image_streams_steps_and_defaults_to_its_size(image_gen: ImageGen) -> None:
    messages = await edit(
        image_gen.stub, prompt="make the sky green", input_images=[png(160, 96)], count=2, seed=11
    )
    assert steps_of(messages) == [(i, 4) for i in range(1, 5)]  # the distilled default: 4 steps
    assert [m.WhichOneof("event") for m in messages] == ["progress"] * 4 + ["result"]
    result = messages[-1].result
    assert result.model == KLEIN  # the image-edit default
    assert (result.seed, result.num_inference_steps) == (11, 4)
    assert result.timing.inference_ms > 0 and result.timing.encode_ms > 0
    assert len(result.images) == 2
    arrays = []
    for image in result.images:
        assert image.mime_type == "image/png"
        decoded = opened(image)
        assert decoded.size == (160, 96)
        arrays.append(np.asarray(decoded, dtype=np.float32))
        assert arrays[-1].std() > 1.0
    assert not np.array_equal(arrays[0], arrays[1])


async def test_an_edit_of_four_images_uses_every_input_and_the_requested_size(image_gen: ImageGen) -> None:
    inputs = [png(160, 96, 1), png(64, 128, 2), png(200, 100, 3), png(96, 96, 4)]
    request = {"prompt": "combine them", "width": 128, "height": 192, "seed": 5}
    messages = await edit(image_gen.stub, input_images=inputs, **request)
    assert steps_of(messages) == [(i, 4) for i in range(1, 5)]
    four = messages[-1].result
    assert [(i.width, i.height) for i in four.images] == [(128, 192)]
    assert opened(four.images[0]).size == (128, 192)
    # The same request with the first input only, or with none (text-to-image), gives other pixels.
    one = await edited(image_gen.stub, input_images=inputs[:1], **request)
    text_only = await generated(image_gen.stub, model=KLEIN, **request)
    assert len({four.images[0].data, one.images[0].data, text_only.images[0].data}) == 3


async def test_match_image_size_overrides_width_and_height(image_gen: ImageGen) -> None:
    result = await edited(
        image_gen.stub,
        prompt="a sunset",
        input_images=[png(176, 112), png(256, 256, 1)],
        width=256,
        height=256,
        match_image_size=True,
        num_inference_steps=1,
        seed=1,
    )
    assert [(i.width, i.height) for i in result.images] == [(176, 112)]


async def test_distilled_and_base_models_differ_in_defaults_and_guidance(image_gen: ImageGen) -> None:
    engines = image_gen.pool.engines
    assert engines[KLEIN].pipe.config.is_distilled is True  # type: ignore[attr-defined]
    assert engines[KLEIN_BASE].pipe.config.is_distilled is False  # type: ignore[attr-defined]
    inputs = [png(64, 64)]
    base = await edit(image_gen.stub, model=KLEIN_BASE, prompt="x", input_images=inputs, seed=2)
    assert steps_of(base) == [(i, 50) for i in range(1, 51)]
    assert base[-1].result.num_inference_steps == 50
    assert base[-1].result.model == KLEIN_BASE
    alias = await edit(image_gen.stub, model="flux-2-klein-4b", prompt="x", input_images=inputs, seed=2)
    assert steps_of(alias) == [(i, 4) for i in range(1, 5)]
    assert alias[-1].result.model == KLEIN

    # Guidance runs only on the base model: there the negative prompt changes the pixels.
    request = {
        "prompt": "x",
        "input_images": inputs,
        "num_inference_steps": 2,
        "seed": 3,
        "guidance_scale": 4.0,
    }
    for model, guided in ((KLEIN_BASE, True), (KLEIN, False)):
        plain = await edited(image_gen.stub, model=model, negative_prompt="", **request)
        negative = await edited(image_gen.stub, model=model, negative_prompt="blurry, dark", **request)
        assert (plain.images[0].data != negative.images[0].data) is guided, model


async def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(image_gen: ImageGen) -> None:
    request = {"prompt": "a red door", "input_images": [png(96, 64), png(64, 64, 9)], "count": 2}
    first = await edited(image_gen.stub, seed=77, **request)
    again = await edited(image_gen.stub, seed=77, **request)
    other = await edited(image_gen.stub, seed=78, **request)
    assert [i.data for i in first.images] == [i.data for i in again.images]
    assert first.images[0].data != other.images[0].data
    drawn = await edited(image_gen.stub, **request)
    replay = await edited(image_gen.stub, seed=drawn.seed, **request)
    assert [i.data for i in drawn.images] == [i.data for i in replay.images]


# --- output formats, metadata, style presets ---


@pytest.mark.parametrize(("enum", "fmt", "mime"), FORMATS, ids=["unspecified", "png", "jpeg", "webp"])
async def test_each_output_format_for_generations_and_edits(
    image_gen: ImageGen, enum: int, fmt: str, mime: str
) -> None:
    common = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 4}
    made = await generated(image_gen.stub, model=KLEIN, output_format=enum, **common)
    changed = await edited(image_gen.stub, input_images=[png(64, 64)], output_format=enum, **common)
    for image in (*made.images, *changed.images):
        assert image.mime_type == mime
        assert opened(image, fmt).format == fmt
        assert read_image_metadata(image.data) == {}  # nothing unless asked


@pytest.mark.parametrize(("enum", "fmt", "mime"), FORMATS[1:], ids=["png", "jpeg", "webp"])
async def test_metadata_is_embedded_when_asked(image_gen: ImageGen, enum: int, fmt: str, mime: str) -> None:
    common = {
        "prompt": "a café at night, 夜",
        "negative_prompt": "blurry",
        "num_inference_steps": 2,
        "seed": 21,
        "output_format": enum,
        "embed_metadata": True,
    }
    made = await generated(image_gen.stub, width=64, height=64, **common)
    changed = await edited(image_gen.stub, model=KLEIN_BASE, input_images=[png(64, 64)], **common)
    for result, model in ((made, "z-image-turbo"), (changed, KLEIN_BASE)):
        image = result.images[0]
        assert image.mime_type == mime and opened(image, fmt).format == fmt
        assert read_image_metadata(image.data) == {
            "prompt": "a café at night, 夜",
            "negative_prompt": "blurry",
            "model": model,
            "seed": "21",
            "steps": "2",
            "Software": "Kiln",
        }
    # Deterministic with metadata too.
    again = await generated(image_gen.stub, width=64, height=64, **common)
    assert again.images[0].data == made.images[0].data


async def test_a_style_preset_is_applied_once_to_both_prompts(image_gen: ImageGen) -> None:
    style = image_gen.registry.style("anime")
    common = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": 1, "seed": 8}
    styled = await generated(
        image_gen.stub, width=64, height=64, style_preset="anime", embed_metadata=True, **common
    )
    plain = await generated(image_gen.stub, width=64, height=64, embed_metadata=True, **common)
    metadata = read_image_metadata(styled.images[0].data)
    assert metadata["prompt"] == style.prompt.replace("{prompt}", "a cat")
    assert metadata["prompt"].startswith("anime artwork of a cat")
    assert metadata["negative_prompt"] == f"blurry, {style.negative_prompt}"
    assert read_image_metadata(plain.images[0].data)["prompt"] == "a cat"
    assert styled.images[0].data != plain.images[0].data
    # An edit takes the preset too.
    edit_result = await edited(
        image_gen.stub, input_images=[png(64, 64)], style_preset="watercolor", embed_metadata=True, **common
    )
    assert read_image_metadata(edit_result.images[0].data)["prompt"].startswith(
        "watercolor painting of a cat"
    )


# --- masks ---


def mask_png(width: int, height: int, hole: tuple[int, int, int, int]) -> bytes:
    """An opaque RGBA mask with a fully transparent rectangle (the area to repaint)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    return encode_image(mask, "png")


async def test_a_mask_repaints_its_transparent_area_and_keeps_the_rest(image_gen: ImageGen) -> None:
    source = picture(128, 96, 3)
    hole = (32, 16, 96, 80)
    for model, steps in ((KLEIN, 4), (KLEIN_BASE, 3)):
        step_field = {} if model == KLEIN else {"num_inference_steps": steps}  # KLEIN: its default
        messages = await edit(
            image_gen.stub,
            model=model,
            prompt="a window",
            input_images=[encode_image(source), png(64, 64, 5)],  # the second is a reference
            mask=mask_png(128, 96, hole),
            seed=6,
            **step_field,
        )
        result = messages[-1].result
        out = np.asarray(opened(result.images[0]).convert("RGB"), dtype=np.int16)
        src = np.asarray(source, dtype=np.int16)
        keep = np.ones((96, 128), dtype=bool)
        keep[hole[1] : hole[3], hole[0] : hole[2]] = False
        assert np.array_equal(out[keep], src[keep]), model  # opaque pixels kept exactly
        assert np.abs(out[~keep] - src[~keep]).mean() > 5, model  # the hole was repainted
        assert steps_of(messages) == [(i, steps) for i in range(1, steps + 1)]


async def test_bad_masks_are_refused(image_gen: ImageGen) -> None:
    inputs = [png(128, 96)]
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"mask": mask_png(64, 64, (0, 0, 32, 32))},
            "The mask is 64x64 pixels; it must be the size of the first input image (128x96)",
        ),
        (
            {"mask": encode_image(Image.new("L", (128, 96), 0))},
            "The mask must have an alpha channel: its fully transparent pixels mark the area to edit.",
        ),
        (
            {"mask": encode_image(Image.new("RGBA", (128, 96), (0, 0, 0, 255)))},
            "The mask has no fully transparent pixels, so there is nothing to edit.",
        ),
        (
            {"mask": b"not a png at all"},
            "The mask: the file is not a supported image (accepted: png, jpeg, webp).",
        ),
        (
            {"model": LONGCAT, "mask": mask_png(128, 96, (0, 0, 32, 32))},
            f"The mask parameter is not supported by model {LONGCAT}",
        ),
    ]
    for fields, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await edit(image_gen.stub, prompt="x", input_images=inputs, **fields)
        assert_invalid_request(info.value, message)


# --- LongCat ---


async def test_longcat_edits_one_image_through_its_edit_pipeline(image_gen: ImageGen) -> None:
    messages = await edit(
        image_gen.stub,
        model=LONGCAT,
        prompt="make it blue",
        input_images=[png(128, 96)],
        num_inference_steps=2,
        seed=3,
    )
    assert steps_of(messages) == [(1, 2), (2, 2)]
    result = messages[-1].result
    assert result.model == LONGCAT
    decoded = opened(result.images[0])
    assert decoded.size == (128, 96)  # the pipeline's ~1 MP output fitted to the first input's size
    assert np.asarray(decoded, dtype=np.float32).std() > 1.0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edit(image_gen.stub, model=LONGCAT, prompt="x", input_images=[png(64, 64), png(64, 64)])
    assert_invalid_request(info.value, f"Too many input images: 2; the {LONGCAT} model accepts at most 1")


# --- errors ---


def png_bomb(side: int = 30_000) -> bytes:
    """A PNG whose header claims side x side pixels, with a few hundred bytes of compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    body = zlib.compress(b"\x00" * (1 + side // 8) * 64, 9)  # the first 64 rows
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


async def test_a_decompression_bomb_is_refused_from_its_header(image_gen: ImageGen) -> None:
    bomb = png_bomb()
    assert len(bomb) < 2_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edit(image_gen.stub, prompt="x", input_images=[bomb])
    error = assert_invalid_request(info.value)
    assert error.message.startswith("Input image 1: the image is too large to decode (a decompression bomb)")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"input_images": [png(64, 64)] * 5},
            f"Too many input images: 5; the {KLEIN} model accepts at most 4",
        ),
        (
            {"input_images": [b"GIF89a, or rather not an image at all"]},
            "Input image 1: the file is not a supported image (accepted: png, jpeg, webp).",
        ),
        (
            {"input_images": [png(64, 64), b"hello"]},
            "Input image 2: the file is not a supported image (accepted: png, jpeg, webp).",
        ),
        (
            {"input_images": [png(64, 64), png(64, 64)[:100]]},
            "Input image 2: the image could not be decoded; it may be truncated or corrupt.",
        ),
        (
            {"input_images": [big_png(5000)]},
            "Input image 1: the image is too large: 5000x5000 pixels, the maximum is 16777216 pixels.",
        ),
        (
            {"input_images": [b"\x00" * (20 * 1024 * 1024 + 1)]},
            "Input image 1: the image file is 20971521 bytes; the maximum is 20971520 bytes.",
        ),
        ({"input_images": []}, "An edit needs at least one input image ('input_images' or 'image')"),
        (
            {"input_images": [png(32, 64)], "width": 64, "height": 64},
            f"Input image 1 is 32x64 pixels; the {KLEIN} model needs at least 64 pixels on each side",
        ),
        (
            {"input_images": [png(64, 64), png(600, 64)], "width": 64, "height": 64},
            f"Input image 2 is 600x64 pixels; the {KLEIN} model accepts aspect ratios up to 8:1",
        ),
        (
            {"input_images": [png(64, 64)], "width": 100, "height": 128},
            f"The dimensions 100x128 must be multiples of 16 for the {KLEIN} model",
        ),
        (
            {"input_images": [png(64, 64)], "width": 128},
            "Give both 'width' and 'height'",
        ),
        (
            {"input_images": [png(64, 64)], "width": 4096, "height": 1024},
            f"The dimensions 4096x1024 exceed the maximum allowed for the {KLEIN} model (2048x2048)",
        ),
        (
            {"input_images": [png(64, 64)], "model": "z-image-turbo"},
            f"Invalid model ID 'z-image-turbo'. Supported models: longcat-image-edit, {KLEIN}, {KLEIN_BASE}",
        ),
        (
            {"input_images": [png(64, 64)], "style_preset": "no-such-style"},
            "Unknown style_preset 'no-such-style'. Supported presets: photographic, cinematic, anime, "
            "digital-art, 3d-model, watercolor, pixel-art, line-art, comic-book, fantasy-art "
            "(GET /v1/images/styles)",
        ),
        (
            {"input_images": [png(64, 64)], "output_format": 9},
            "Unknown output_format 9; use PNG, JPEG or WEBP",
        ),
        (
            {"input_images": [png(64, 64)], "prompt": ""},
            "'prompt' is required and must not be empty",
        ),
    ],
    ids=[
        "too-many-inputs",
        "undecodable",
        "undecodable-second",
        "truncated",
        "over-pixel-limit",
        "over-byte-limit",
        "no-inputs",
        "input-too-small",
        "input-too-narrow",
        "not-multiple-of-16",
        "width-without-height",
        "too-large-output",
        "model-cannot-edit",
        "unknown-style",
        "unknown-format",
        "empty-prompt",
    ],
)
async def test_invalid_edits_fail_with_invalid_argument(
    image_gen: ImageGen, fields: dict[str, Any], message: str
) -> None:
    request = {"prompt": "x", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edit(image_gen.stub, **request)
    assert_invalid_request(info.value, message)


async def test_generation_refuses_an_unknown_output_format(image_gen: ImageGen) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generated(image_gen.stub, prompt="x", width=64, height=64, output_format=7)
    assert_invalid_request(info.value, "Unknown output_format 7; use PNG, JPEG or WEBP")
